"""What the trained models of an MQAR sweep do, one CSV row per finished run.

    python -m tools.mqar_mechanisms SWEEP_DIR --out results/mqar_v2/mechanisms

Every run dir of SWEEP_DIR with results.json status ok and a best checkpoint is loaded
(efficient_attn_tasks/inference/checkpoint.py) and scored on its test split through the task's own metric
path (``MQARModule.eval_logits``, as ``efficient-attn-eval`` does): acc, in_context, acc_pair0..K−1 (and
``acc_recorded``, the run's own results.json test/acc, which acc reproduces when the checkpoint is the one the
run tested). Beside them:

- ``reach1`` / ``reach_stack``: for a model whose every attention is a causal sliding window of w keys, the
  share of test queries whose key lies within w − 1 (one layer) and n·(w − 1) (the stack of n layers) of the
  query, counted on the test split itself (``mqar.key_distances``); ``acc_near`` / ``acc_far``: the accuracy
  of the queries within / beyond the stack's reach. Empty for other attentions.
- ``rows``, ``kl_softmax_model``, ``kl_model_softmax``, ``softmax_mass``: the model's own attention rows against
  softmax's on the q, k of ``--rows-batch`` test sequences (efficient_attn/analysis/rows.py), averaged over
  the attention sites; ``rows`` "no rows" (gated, delta rule, retention, dot) leaves them empty.

Nothing is written into SWEEP_DIR. CPU, seconds per run; the splits of a cell are generated once.
Writes OUT.csv and OUT.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import warnings
from pathlib import Path
from typing import Any

import torch

FIXED = ["run", "attention", "seq_len", "num_kv_pairs", "d_model", "lr", "seed", "checkpoint", "acc_recorded", "acc",
         "in_context"]
AFTER = ["window", "layers", "reach1", "reach_stack", "acc_near", "acc_far",
         "rows", "kl_softmax_model", "kl_model_softmax", "softmax_mass"]


def finished_runs(sweep: Path) -> list[Path]:
    """Run dirs of ``sweep`` with results.json status ok and a checkpoints/ folder, sorted by name."""
    found = []
    for results in sorted(sweep.glob("*/results.json")):
        record = json.loads(results.read_text())
        if record.get("status") == "ok" and record.get("task") == "mqar" and (results.parent / "checkpoints").is_dir():
            found.append(results.parent)
    return found


def window_layers(model: torch.nn.Module) -> tuple[int, int] | None:
    """(window, layers) when every core attention of ``model`` is a sliding window of one size, else None."""
    from efficient_attn import Attention
    from efficient_attn.attention.sliding_window import SlidingWindowAttention

    sites = [m for m in model.modules() if isinstance(m, Attention)]
    windows = {m.window for m in sites if isinstance(m, SlidingWindowAttention)}
    if not sites or len(windows) != 1 or not all(isinstance(m, SlidingWindowAttention) for m in sites):
        return None
    return windows.pop(), len(sites)


def by_reach(distances: torch.Tensor, correct: torch.Tensor, reach: int) -> dict[str, float]:
    """``reach_stack``: the share of queries whose key is at most ``reach`` back; ``acc_near`` / ``acc_far``: the
    accuracy of those and of the others (NaN where there are none). distances, correct (queries,)."""
    near = distances <= reach
    return {"reach_stack": float(near.double().mean()),
            "acc_near": float(correct[near].double().mean()) if near.any() else math.nan,
            "acc_far": float(correct[~near].double().mean()) if (~near).any() else math.nan}


def measure(run_dir: Path, splits_cache: dict[str, Any], rows_batch: int = 32) -> dict[str, Any]:
    """One CSV row for ``run_dir`` (see the module docstring)."""
    from efficient_attn.analysis.rows import rows_against_softmax
    from efficient_attn_tasks.approx.checkpoint import capture
    from efficient_attn_tasks.config.labels import attention_config
    from efficient_attn_tasks.inference.checkpoint import load
    from efficient_attn_tasks.tasks import mqar

    loaded = load(run_dir)
    cfg, module, data = loaded.cfg, loaded.module, loaded.data
    key = json.dumps({k: v for k, v in dict(cfg.task).items() if k not in ("batch_size", "num_workers")},
                     sort_keys=True)
    if key in splits_cache:
        data.splits = splits_cache[key]
    data.setup("test")
    splits_cache[key] = data.splits
    reach = window_layers(module.model)
    kv = cfg.task.num_kv_pairs
    distances, right = [], []
    with torch.no_grad():
        for batch in data.test_dataloader():
            logits = module(batch)  # (B, L, V)
            module.eval_logits(batch, logits, "test")
            tokens, targets = batch["tokens"], batch["targets"]
            distances.append(mqar.key_distances(tokens, targets, kv))
            right.append((logits.argmax(-1) == targets)[targets != mqar.IGNORE])
    means = {name: float(module.means[f"test_{name}"].compute()) for name in module.eval_means}
    row: dict[str, Any] = {
        "run": run_dir.name, "attention": attention_config(cfg), "seq_len": cfg.task.seq_len, "num_kv_pairs": kv,
        "d_model": cfg.model.d_model, "lr": cfg.optim.lr, "seed": cfg.seed, "checkpoint": loaded.path.name,
        "acc_recorded": json.loads((run_dir / "results.json").read_text())["metrics"]["test"].get("test/acc"),
        **{k: means[k] for k in ("acc", "in_context", *(f"acc_pair{i}" for i in range(kv)))},
    }
    if reach is not None:
        window, layers = reach
        dist, ok = torch.cat(distances), torch.cat(right)  # (queries,), matching order (key_distances: row major)
        row |= {"window": window, "layers": layers,
                "reach1": float((dist <= mqar.window_reach(window)).double().mean()),
                **by_reach(dist, ok, mqar.window_reach(window, layers))}
    module.double()
    first = next(iter(data.test_dataloader()))
    sites = capture(module, {k: v[:rows_batch] for k, v in first.items()})
    measured = [rows_against_softmax(s["attention"], s["q"], s["k"], s["mask"], s["causal"]) for s in sites]
    kinds = sorted({m["rows"] for m in measured})
    row["rows"] = "+".join(kinds)
    if any(m["rows"] in ("kernel", "window", "softmax") for m in measured):
        for name in ("kl_softmax_model", "kl_model_softmax", "softmax_mass"):
            row[name] = statistics.mean(m[name] for m in measured if m["rows"] in ("kernel", "window", "softmax"))
    return row


def write(rows: list[dict[str, Any]], out: Path) -> None:
    """OUT.csv (every column, empty where a run has no value) and OUT.md (numbers to 4 significant digits)."""
    pairs = max((r["num_kv_pairs"] for r in rows), default=0)
    header = FIXED + [f"acc_pair{i}" for i in range(pairs)] + AFTER
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header, restval="")
        writer.writeheader()
        writer.writerows(rows)
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    short = [h for h in header if h not in ("run", "checkpoint")]
    lines = ["| " + " | ".join(short) + " |", "|" + "---|" * len(short)]
    lines += ["| " + " | ".join(fmt(r.get(h, "")) for h in short) + " |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def kept_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of an earlier OUT.csv, numbers read back as int or float (empty cells dropped)."""
    from efficient_attn_tasks.report.runs import parse_number

    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{key: parse_number(value) for key, value in row.items() if value != ""} for row in csv.DictReader(f)]


def merged(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Old rows of runs not in ``new``, and ``new``, sorted by run dir name (the order a sweep is read in)."""
    measured = {r["run"] for r in new}
    return sorted([r for r in old if r["run"] not in measured] + new, key=lambda r: r["run"])


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", type=Path, help="an MQAR sweep dir (run dirs with results.json and checkpoints/)")
    p.add_argument("--out", type=Path, required=True, help="OUT.csv and OUT.md are written (suffix replaced)")
    p.add_argument("--rows-batch", type=int, default=32, help="test sequences the attention rows are measured on")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--keep", action="store_true",
                   help="keep OUT.csv's rows of runs this sweep does not measure (their checkpoints are on another "
                        "machine); a run measured here replaces its old row")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    from efficient_attn_tasks.inference.checkpoint import ConfigError

    runs = finished_runs(a.sweep)
    if not runs:
        raise SystemExit(f"{a.sweep}: no finished MQAR run (results.json status ok, checkpoints/)")
    cache: dict[str, Any] = {}
    rows = []
    for run_dir in runs:
        try:
            rows.append(measure(run_dir, cache, a.rows_batch))
        except ConfigError as err:  # e.g. no best checkpoint
            print(f"skipped {run_dir.name}: {err}", flush=True)
            continue
        r = rows[-1]
        print(f"{r['attention']} L{r['seq_len']}_kv{r['num_kv_pairs']} lr={r['lr']} seed={r['seed']}: "
              f"acc={r['acc']:.3f} in_context={r['in_context']:.3f} rows={r['rows']}", flush=True)
    if not rows:
        raise SystemExit(f"{a.sweep}: no run could be measured")
    if a.keep:
        rows = merged(kept_rows(a.out.with_suffix(".csv")), rows)
    write(rows, a.out)
    print(f"wrote {a.out.with_suffix('.csv')} {a.out.with_suffix('.md')}")
    return rows


if __name__ == "__main__":
    main()
