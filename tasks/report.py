"""``efficient-attn-report``: tables from run records (``results.json``), never from W&B files.

    efficient-attn-report multirun/2026-11-21 --out results/tables/quickstart
    efficient-attn-report runs/ --rows attention --pivot task --avg       # an LRA-style attention × task table
    efficient-attn-report runs/ --baseline "multi30k_small / softmax"      # Δ and Welch t-test p per row
    efficient-attn-report multirun/table3 --rows row --metrics "val/bleu (last),val/ppl (last)"
    efficient-attn-report multirun/table3 --rows row --baseline base --wandb efficient-attn

Rows group runs by ``--rows`` (record fields such as ``attention``, ``row``, ``seed``;
``config.<dotted.key>``; ``choices.<group>`` = the config file picked, e.g. ``favor_plus``); cells are mean ± std over
the group's runs (seeds) with n. Metric columns: the best validation value of the monitored metric
("val <monitor> (best)"), every last validation metric ("val/bleu (last)", ...), every test metric
("test/bleu", ...), then resources (parameters, tokens/s, memory, time). ``--baseline <row label>``
adds "Δ <metric> (p)" for every val/ and test/ metric: the difference of means and the two-sided
Welch t-test p ("n<2" when a side has fewer than two runs), so runs with test=false get Δ on their
last validation metrics. ``--metrics`` keeps only the named metric columns (n and resources stay);
an unknown name is an error listing the known ones. ``--wandb PROJECT`` also logs the table as a
``wandb.Table`` in a run with job_type "report" (mode: ``WANDB_MODE``, else online when logged in,
else offline). A run dir whose ``results.json`` is missing (crashed, killed, still running) gets a
row saying so.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from scipy import stats

RESOURCES = ("num_parameters", "steps", "skipped_updates", "train_tokens_per_s", "peak_memory_mib", "wall_time_s")
HEADLINE = {"translation": "test/bleu", "listops": "test/acc", "lm": "test/bpc"}  # --pivot task columns
LOWER_IS_BETTER = {"lm"}  # left out of the Avg column: an average of accuracy and bits/byte means nothing


def find_runs(roots: list[Path]) -> tuple[list[dict[str, Any]], list[Path]]:
    """(records, run dirs without results.json); a run dir is one with a .hydra/ folder."""
    records, missing = [], []
    for root in roots:
        for hydra_dir in sorted(root.rglob(".hydra")):
            result = hydra_dir.parent / "results.json"
            if result.exists():
                record = json.loads(result.read_text())
                record.setdefault("row", (record.get("config") or {}).get("row"))  # the ablation row label
                choices = _choices(hydra_dir)
                # the attention config file (favor_plus, favor_trig), not the registry name (favor) they share
                record["attention"] = choices.get("attention") or record.get("attention")
                records.append({**record, "_dir": str(hydra_dir.parent), "choices": choices})
            else:
                missing.append(hydra_dir.parent)
    return records, missing


def _choices(hydra_dir: Path) -> dict[str, str]:
    """The config files the run picked per group (``choices.attention`` = ``favor_plus``, not ``favor``)."""
    try:
        return dict(OmegaConf.load(hydra_dir / "hydra.yaml").hydra.runtime.choices)
    except (OSError, OmegaConfBaseException):
        return {}


def field(record: dict[str, Any], key: str) -> Any:
    """A record field, or ``config.a.b`` for a resolved config value."""
    value: Any = record
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def metrics(record: dict[str, Any]) -> dict[str, float | None]:
    """Metric columns of one run: best val, last val metrics as "<key> (last)", test metrics, resources."""
    m = record["metrics"]
    last = {f"{k} (last)": v for k, v in sorted((m.get("val_last") or {}).items())}
    row = {f"val {m['monitor']} (best)": m["val_best"], **last, **dict(sorted(m["test"].items()))}
    return {**row, **{k: record[k] for k in RESOURCES if k in record}}  # older records lack some


def mean_std(values: list[float | None]) -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "n/a"
    if len(values) == 1:
        return _num(values[0])
    return f"{_num(statistics.mean(values))} ± {_num(statistics.stdev(values))}"


def _num(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.4g}"


def welch(a: list[float], b: list[float]) -> str:
    """Two-sided Welch t-test p-value, or why there is none."""
    if len(a) < 2 or len(b) < 2:
        return "n<2"
    if statistics.pstdev(a) == 0 and statistics.pstdev(b) == 0:
        return "1" if statistics.mean(a) == statistics.mean(b) else "0"
    return f"{stats.ttest_ind(a, b, equal_var=False).pvalue:.3g}"


def group(records: list[dict[str, Any]], keys: list[str]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[" / ".join(str(field(r, k)) for k in keys)].append(r)
    return dict(sorted(groups.items()))


def table(records: list[dict[str, Any]], missing: list[Path], rows: list[str] | None = None,
          baseline: str | None = None, keep: list[str] | None = None) -> tuple[list[str], list[list[str]]]:
    """One row per group: n, every metric as mean ± std, and Δ / p against ``baseline`` if given.

    ``keep``: only these metric columns, in this order (resources stay); unknown names are an error.
    """
    groups = group(records, rows or ["name", "task", "attention"])
    flat = {label: [metrics(r) for r in runs] for label, runs in groups.items()}
    names = columns(flat, keep)
    header = [" / ".join(rows or ["name", "task", "attention"]), "n", *names]
    compared = [k for k in names if k.startswith(("test/", "val/")) and _numeric(flat, k)]  # Δ columns
    if baseline is not None:
        if baseline not in flat:
            raise SystemExit(f"--baseline {baseline!r} is not a row; rows: {list(flat)}")
        header += [f"Δ {k} (p)" for k in compared]
    body = []
    for label, runs in flat.items():
        row = [label, str(len(runs)), *(mean_std([r.get(k) for r in runs]) for k in names)]
        if baseline is not None:
            row += [_delta([r.get(k) for r in runs], [r.get(k) for r in flat[baseline]]) for k in compared]
        body.append(row)
    body += [[f"{path} (missing results.json)", "0", *["n/a"] * (len(header) - 2)] for path in missing]
    return header, body


def columns(flat: dict[str, list[dict[str, Any]]], keep: list[str] | None = None) -> list[str]:
    """Column names in first-seen order; with ``keep``, only those metrics (in its order) and resources."""
    names = list(dict.fromkeys(k for runs in flat.values() for row in runs for k in row))
    if keep is None:
        return names
    known = [k for k in names if k not in RESOURCES]
    unknown = [k for k in keep if k not in known]
    if unknown:
        raise SystemExit(f"--metrics: unknown metric(s) {unknown}; known: {known}")
    return [*dict.fromkeys(keep), *(k for k in names if k in RESOURCES)]


def _numeric(flat: dict[str, list[dict[str, Any]]], key: str) -> bool:
    values = [row.get(key) for runs in flat.values() for row in runs]
    return all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in values)


def _delta(values: list[float | None], base: list[float | None]) -> str:
    a, b = [v for v in values if v is not None], [v for v in base if v is not None]
    if not a or not b:
        return "n/a"
    return f"{statistics.mean(a) - statistics.mean(b):+.4g} ({welch(a, b)})"


def pivot(records: list[dict[str, Any]], missing: list[Path], rows: list[str], avg: bool) -> tuple[list[str], list[list[str]]]:
    """Rows × tasks: each task's headline test metric (mean ± std, n); Avg of the row's task means
    over the higher-is-better tasks (accuracy, BLEU), as LRA averages accuracies."""
    tasks = sorted({r["task"] for r in records})
    averaged = [t for t in tasks if t not in LOWER_IS_BETTER]
    avg_header = "Avg" if averaged == tasks else f"Avg ({', '.join(averaged)})"
    header = [" / ".join(rows), *(f"{t} {HEADLINE.get(t, '?')}" for t in tasks)] + ([avg_header] if avg else [])
    body = []
    for label, runs in group(records, rows).items():
        cells, means = [], []
        for t in tasks:
            values = [r["metrics"]["test"].get(HEADLINE.get(t, "")) for r in runs if r["task"] == t]
            values = [v for v in values if v is not None]
            cells.append(f"{mean_std(values)} (n={len(values)})" if values else "missing")
            if t in averaged:
                means.append(statistics.mean(values) if values else None)
        if avg:
            cells.append(_num(statistics.mean(means)) if None not in means else "n/a")
        body.append([label, *cells])
    body += [[f"{path} (missing results.json)", *["n/a"] * (len(header) - 1)] for path in missing]
    return header, body


def markdown(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body]) + "\n"


def log_to_wandb(project: str, header: list[str], body: list[list[str]], config: dict[str, Any]) -> None:
    """Log the table as ``report/table`` in a new W&B run (job_type "report"), always finished."""
    import wandb

    try:
        run = _start_wandb(project, config)
        run.log({"report/table": wandb.Table(columns=header, data=body)})
    finally:
        wandb.finish()


def _start_wandb(project: str, config: dict[str, Any]) -> Any:
    """A W&B run in ``wandb_mode(None)``; an online start that fails falls back to offline, as training does."""
    import wandb

    from .loggers import wandb_mode

    mode = wandb_mode(None)
    try:
        return wandb.init(project=project, job_type="report", mode=mode, config=config)
    except Exception as err:  # noqa: BLE001 - any failure to reach W&B: bad key, no network, timeout
        if mode != "online":
            raise
        warnings.warn(f"W&B online start failed ({type(err).__name__}: {err}); logging offline instead")
        return wandb.init(project=project, job_type="report", mode="offline", config=config)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Tables from efficient-attn run records (results.json).")
    p.add_argument("dirs", nargs="+", type=Path, help="run or multirun dirs (searched recursively)")
    p.add_argument("--rows", default="name,task,attention", help="comma-separated grouping keys")
    p.add_argument("--baseline", help="a row label: adds Δ and Welch t-test p for every val/ and test/ metric")
    p.add_argument("--metrics", help='comma-separated metric columns to keep, e.g. "val/bleu (last),val/ppl (last)"')
    p.add_argument("--pivot", choices=["task"], help="columns = tasks (each task's headline test metric)")
    p.add_argument("--avg", action="store_true", help="with --pivot: an Avg column over tasks")
    p.add_argument("--out", type=Path, help="write <out>.md and <out>.csv")
    p.add_argument("--wandb", metavar="PROJECT", help="also log the table to this W&B project (job_type report)")
    return p


def main(argv: list[str] | None = None) -> None:
    p = parser()
    args = p.parse_args(argv)
    if args.pivot and args.metrics:
        p.error("--metrics selects columns of the grouped table; --pivot shows each task's headline metric")
    records, missing = find_runs(args.dirs)
    if not records and not missing:
        p.error(f"no run dirs (with .hydra/) under {[str(d) for d in args.dirs]}")
    rows = args.rows.split(",")
    keep = [k.strip() for k in args.metrics.split(",")] if args.metrics else None
    header, body = (pivot(records, missing, rows, args.avg) if args.pivot
                    else table(records, missing, rows, args.baseline, keep))
    text = markdown(header, body)
    print(text)
    if args.out:
        write(header, body, text, args.out)
    if args.wandb:
        config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "wandb"}
        log_to_wandb(args.wandb, header, body, {**config, "dirs": [str(d) for d in args.dirs]})


def write(header: list[str], body: list[list[str]], text: str, out: Path) -> None:
    """<out>.md (the Markdown text) and <out>.csv."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        csv.writer(f).writerows([header, *body])


if __name__ == "__main__":
    main()
