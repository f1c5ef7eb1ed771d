"""FAVOR+ approximation error against exact softmax on random inputs: the default study of ``efficient-attn-approx``.

Owns the grid logit std × number of features m (:func:`efficient_attn.analysis.approx.error_grid`: every sample
a fresh q, k, v and fresh features), its CSV, its heat maps (each estimator's MSE against positive orthogonal
features', and those against the uniform average), its two slices with the old names (error against m at one
logit std, against the logit std at one m: a panel for the MSE of the attention output, one for KL(P ‖ P̂) of
attention rows, mean ± std over samples, the uniform average drawn black), ``summary.md`` (which of the
Performer paper's claims hold at each logit std, :func:`claim_checks`) and their logging to an active W&B run.
The PNG drawing and the CSV writer serve the ``--checkpoint`` study too.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path
from typing import Any

from efficient_attn_tasks.commands.cli import wrote
from efficient_attn_tasks.plots import HeatMap, Line, Panel, error_bands, heat_maps

POSITIVE, IID, TRIG = "positive / orthogonal", "positive / iid", "trig / orthogonal"
UNIFORM = "uniform average (ignores q, k)"


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


X_LABELS = {
    "num_features": "random features m",
    "scale": "logit std (std of q·k/√d; q, k entries have std √scale)",
    "layer": "layer (attention sites in forward order)",
}


KL_LABEL = "KL(P ‖ P̂) of attention rows vs exact softmax"


def plot(rows: list[dict[str, Any]], x: str, path: Path, title: str,
         ylabel: str = "MSE of attention output vs exact softmax") -> Path:
    """Log-log mean error per estimator with a ±1 std band: an MSE panel, and a KL panel beside it when
    the rows have ``kl_mean``; points that were all non-finite are left out (their count is in the legend)."""
    panels = [("mse_mean", "mse_std", "non_finite", ylabel)]
    if "kl_mean" in rows[0]:
        panels.append(("kl_mean", "kl_std", "kl_non_finite", KL_LABEL))
    drawn = []
    for mean_key, std_key, bad_key, label in panels:
        lines = []
        for i, est in enumerate(dict.fromkeys(r["estimator"] for r in rows)):  # one colour per estimator
            bad = sum(r[bad_key] for r in rows if r["estimator"] == est)
            pts = [r for r in rows if r["estimator"] == est and not math.isnan(r[mean_key])]
            tag = est + (f" ({bad} non-finite)" if bad else "")
            mean = [r[mean_key] for r in pts]
            lines.append(Line(tag if pts else tag + ", no finite point", [r[x] for r in pts], mean, index=i,
                              lo=[max(m - r[std_key], m * 1e-3) for m, r in zip(mean, pts)],
                              hi=[m + r[std_key] for m, r in zip(mean, pts)]))
        uniform = "uniform_" + mean_key
        if uniform in rows[0]:  # one baseline per x: the rows of the first estimator carry it
            pts = [r for r in rows if r["estimator"] == rows[0]["estimator"]]
            mean = [r[uniform] for r in pts]
            std = [r[uniform.replace("_mean", "_std")] for r in pts]
            lines.append(Line(UNIFORM, [r[x] for r in pts], mean, reference=True,
                              lo=[max(m - s, m * 1e-3) for m, s in zip(mean, std)],
                              hi=[m + s for m, s in zip(mean, std)]))
        drawn.append(Panel(lines, title=title, xlabel=X_LABELS[x], ylabel=label, yscale="log"))
    return error_bands(drawn, path, x_base=None if x == "layer" else 2 if x == "num_features" else 10)


def log_to_wandb(outputs: dict[str, tuple[Path, list[dict[str, Any]]]]) -> None:
    if "wandb" not in sys.modules:
        return
    import wandb

    if wandb.run is None:
        return
    for name, (png, rows) in outputs.items():
        table = wandb.Table(columns=list(rows[0]), data=[list(r.values()) for r in rows])
        wandb.log({f"approx/{name}": wandb.Image(str(png)), f"approx/{name}_table": table})


def run(a: argparse.Namespace) -> dict[str, tuple[Path, list[dict[str, Any]]]]:
    """The logit std × m grid on random inputs and its two slices; returns {name: (png, rows)}, writes summary.md."""
    import torch

    from efficient_attn.analysis.approx import ESTIMATORS, error_grid, estimator
    from efficient_attn.registry import get_attention_class, import_attentions

    import_attentions(getattr(a, "imports", []))
    extra = [name for name in getattr(a, "attentions", "").split(",") if name]
    for name in extra:
        get_attention_class(name)  # unknown names fail here, with the registered ones listed

    if a.quick:
        a.length, a.draws, a.features, a.scales, a.scale, a.scale_features = 256, 3, [16, 64], [0.5, 1.0], 1.0, 64
    if a.threads:
        torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    scales, features = sorted({*a.scales, a.scale}), sorted({*a.features, a.scale_features})
    rows = error_grid(scales, features, length=a.length, dim=a.dim, samples=a.draws, seed=a.seed,
                      kl_rows=a.kl_rows, estimators=[*ESTIMATORS, *map(estimator, extra)])
    setup = f"L={a.length}, d={a.dim}, {a.draws} samples (fresh q, k, v and features each)"
    write_csv(rows, a.out / "grid.csv")
    grid_plot(rows, a.out / "grid.png", setup)
    wrote(a.out / "grid.csv", a.out / "grid.png")
    outputs = {"grid": (a.out / "grid.png", rows)}
    for name, sub, x, title in (
        ("error_vs_features", [r for r in rows if r["scale"] == a.scale], "num_features",
         f"{setup}, logit std {a.scale}"),
        ("error_vs_scale", [r for r in rows if r["num_features"] == a.scale_features], "scale",
         f"{setup}, m={a.scale_features}"),
    ):
        outputs[name] = save(sub, x, a.out / name, title)
    command = " ".join(["efficient-attn-approx", *getattr(a, "argv", [])])
    (a.out / "summary.md").write_text(summary(rows, setup, command))
    wrote(a.out / "summary.md")
    log_to_wandb(outputs)
    return outputs


def save_table(rows: list[dict[str, Any]], stem: Path) -> list[dict[str, Any]]:
    """``stem``.csv and ``stem``.md of ``rows`` (no plot); numbers to 4 significant digits in the Markdown."""
    write_csv(rows, stem.with_suffix(".csv"))
    header = list(rows[0])
    cells = [[f"{v:.4g}" if isinstance(v, float) else str(v) for v in r.values()] for r in rows]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c) + " |" for c in cells]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    wrote(stem.with_suffix(".csv"), stem.with_suffix(".md"))
    return rows


def grid_plot(rows: list[dict[str, Any]], path: Path, setup: str) -> Path:
    """One heat map per estimator over logit std × m: log10 of its MSE over positive orthogonal features' MSE
    (for positive orthogonal itself: over the uniform average's), each cell's text the MSE and KL ratios."""
    scales = sorted({r["scale"] for r in rows})
    features = sorted({r["num_features"] for r in rows})
    by = {(r["estimator"], r["scale"], r["num_features"]): r for r in rows}
    maps = []
    for est in dict.fromkeys(r["estimator"] for r in rows):
        values, text = [], []
        for s in scales:
            values.append([])
            text.append([])
            for m in features:
                r = by[est, s, m]
                if est == POSITIVE or (POSITIVE, s, m) not in by:
                    ref_mse, ref_kl = r["uniform_mse_mean"], r["uniform_kl_mean"]
                else:
                    ref = by[POSITIVE, s, m]
                    ref_mse, ref_kl = value(ref, "mse"), value(ref, "kl")
                mse, kl = value(r, "mse") / ref_mse, value(r, "kl") / ref_kl
                values[-1].append(math.log10(mse) if mse > 0 else -math.inf)
                text[-1].append(f"{_ratio(mse)}\n{_ratio(kl)}")
        against = "uniform average" if est == POSITIVE or (POSITIVE, scales[0], features[0]) not in by else POSITIVE
        maps.append(HeatMap(values, text, [str(m) for m in features], [f"{s:g}" for s in scales],
                            title=f"{est}\nvs {against}", xlabel="random features m", ylabel="logit std"))
    return heat_maps(maps, path, f"Error ratios, {setup}: cell text MSE ratio / KL ratio (mean over samples)",
                     "log10 MSE ratio (blue: the estimator is closer to softmax)")


def _ratio(x: float) -> str:
    return "∞" if math.isinf(x) else "–" if math.isnan(x) else f"{x:.2g}"


def value(row: dict[str, Any], metric: str) -> float:
    """A row's mean ``mse`` or ``kl``; +inf when any sample's is not finite (a signed weight makes KL(P ‖ P̂)
    infinite, and so its mean), NaN when the metric was not measured."""
    if row[f"{metric}_non_finite" if metric == "kl" else "non_finite"]:
        return math.inf
    return row[f"{metric}_mean"]


def _cell(row: dict[str, Any], metric: str) -> str:
    v = value(row, metric)
    if math.isinf(v):
        bad = row["kl_non_finite" if metric == "kl" else "non_finite"]
        return f"∞ ({bad}/{row['samples']} samples)"
    return f"{v:.2e} ± {row[f'{metric}_std']:.1e}"


def _uniform(row: dict[str, Any]) -> dict[str, Any]:
    """The uniform average's numbers as a row of their own."""
    return {"mse_mean": row["uniform_mse_mean"], "mse_std": row["uniform_mse_std"], "non_finite": 0,
            "kl_mean": row["uniform_kl_mean"], "kl_std": row["uniform_kl_std"], "kl_non_finite": 0,
            "samples": row["samples"]}


CLAIMS = {
    "a": "positive features beat trig features at equal m (orthogonal projections)",
    "b": "orthogonal projections beat iid ones (positive features)",
    "c": "the error of positive orthogonal features falls with m (at each step to the next m)",
    "d": "FAVOR+ (positive orthogonal) beats the uniform average, which ignores q and k",
}


SHORT = {"a": "(a) positive beats trig", "b": "(b) orthogonal beats iid", "c": "(c) falls with m",
         "d": "(d) FAVOR+ beats uniform"}


def clear(a: dict[str, Any], b: dict[str, Any], metric: str) -> bool:
    """Whether two rows' means differ by over 2 standard errors of the difference (unpaired; an infinite
    mean always does)."""
    va, vb = value(a, metric), value(b, metric)
    if math.isinf(va) or math.isinf(vb):
        return va != vb
    se = math.sqrt(a[f"{metric}_std"] ** 2 / a["samples"] + b[f"{metric}_std"] ** 2 / b["samples"])
    return abs(va - vb) > 2 * se


def claim_checks(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each logit std, claim and metric (``mse``, ``kl``): the m where the claim holds (mean below the other
    side's) out of those tested, the m where the two differ by over 2 standard errors (``clear``), and the pairs
    compared there ({m: (row of the claim's side, row of the other side)}; for (c) each m from the
    second on, against the m before). A claim whose estimators are not in ``rows`` is left out."""
    by = {(r["estimator"], r["scale"], r["num_features"]): r for r in rows}
    scales = sorted({r["scale"] for r in rows})
    features = sorted({r["num_features"] for r in rows})
    labels = {r["estimator"] for r in rows}
    checks = []
    for s in scales:
        for claim in CLAIMS:
            other = {"a": TRIG, "b": IID}.get(claim)
            if POSITIVE not in labels or (other and other not in labels):
                continue
            pairs = {}
            for i, m in enumerate(features):
                mine = by[POSITIVE, s, m]
                if claim == "c":
                    if i:
                        pairs[m] = (mine, by[POSITIVE, s, features[i - 1]])
                else:
                    pairs[m] = (mine, by[other, s, m] if other else _uniform(mine))
            for metric in ("mse", "kl"):
                if any(math.isnan(value(a, metric)) for a, _ in pairs.values()):
                    continue  # not measured (--kl-rows 0, or an estimator without weights)
                holds = [m for m, (a, b) in pairs.items() if value(a, metric) < value(b, metric)]
                checks.append({"scale": s, "claim": claim, "metric": metric, "holds_at": holds,
                               "tested": list(pairs), "pairs": pairs,
                               "clear": [m for m, (a, b) in pairs.items() if clear(a, b, metric)]})
    return checks


def verdict(check: dict[str, Any]) -> str:
    """"holds (5/5 m, 4 clear)", "reversed (0/5 m, 5 clear)" or "mixed: holds at m = 64, 128 (2/5 m, 1 clear)";
    for (c) the steps (m is the larger of the two). Clear: the means differ by over 2 standard errors."""
    k, n = len(check["holds_at"]), len(check["tested"])
    unit = "steps" if check["claim"] == "c" else "m"
    tail = f"{k}/{n} {unit}, {len(check['clear'])} clear"
    if k == n:
        return f"holds ({tail})"
    if k == 0:
        return f"reversed ({tail})"
    at = ", ".join(str(m) for m in check["holds_at"])
    return f"mixed: holds at m = {at} ({tail})"


def summary(rows: list[dict[str, Any]], setup: str, command: str = "efficient-attn-approx") -> str:
    """summary.md: the regimes (entropy and uniform average per logit std), a verdict per claim and logit std,
    and the numbers behind each (mean ± std over samples) at the smallest and the largest m."""
    checks = claim_checks(rows)
    scales = sorted({r["scale"] for r in rows})
    features = sorted({r["num_features"] for r in rows})
    first = {s: next(r for r in rows if r["scale"] == s) for s in scales}
    lines = [
        "# Which of the Performer paper's approximation claims hold, per logit scale",
        "",
        f"Machine-written by `{command}`. {setup}; `scale` is the std of the logits q·k/√d (q, k entries "
        "have std √scale). Numbers are mean ± std over the samples; KL is KL(P ‖ P̂) of attention rows "
        "(∞ when a sample's estimated row has a weight ≤ 0). All rows in `grid.csv`.",
        "",
        "## Regimes: how far exact rows are from uniform",
        "",
        "| logit std | measured | entropy H(P) | max log S | uniform average MSE | KL(P ‖ uniform) |",
        "|---|---|---|---|---|---|",
    ]
    for s in scales:
        r = first[s]
        lines.append(f"| {s:g} | {r['logit_std_measured']:.3f} | {r['entropy_mean']:.3f} ± {r['entropy_std']:.1e} "
                     f"| {r['entropy_max']:.3f} | {_cell(_uniform(r), 'mse')} | "
                     f"{_cell(_uniform(r), 'kl')} |")
    lines += ["", "## Verdicts (MSE of the output / KL of the rows)", "",
              *[f"- ({c}) {text}" for c, text in CLAIMS.items()],
              "- clear: the two means differ by over 2 standard errors (std/√samples, unpaired)", "",
              "| logit std | " + " | ".join(SHORT.values()) + " |",
              "|---|" + "---|" * len(CLAIMS)]
    for s in scales:
        cells = []
        for c in CLAIMS:
            found = {x["metric"]: verdict(x) for x in checks if x["scale"] == s and x["claim"] == c}
            cells.append(" / ".join(f"{metric.upper()}: {found[metric]}" for metric in ("mse", "kl")
                                    if metric in found) or "not measured")
        lines.append(f"| {s:g} | " + " | ".join(cells) + " |")
    sides = {"a": (POSITIVE, TRIG), "b": (POSITIVE, IID), "c": ("m", "previous m"), "d": (POSITIVE, UNIFORM)}
    for c, text in CLAIMS.items():
        mine = [x for x in checks if x["claim"] == c]
        if not mine:
            continue
        shown = sorted({mine[0]["tested"][0], mine[0]["tested"][-1]})
        lines += ["", f"### ({c}) {text}", "", f"Each cell: {sides[c][0]} vs {sides[c][1]}.", "",
                  "| logit std | metric | verdict | " + " | ".join(f"m = {m}" for m in shown) + " |",
                  "|---|---|---|" + "---|" * len(shown)]
        for x in mine:
            cells = [f"{_cell(x['pairs'][m][0], x['metric'])} vs {_cell(x['pairs'][m][1], x['metric'])}"
                     for m in shown]
            lines.append(f"| {x['scale']:g} | {x['metric'].upper()} | {verdict(x)} | " + " | ".join(cells) + " |")
    lines += ["", f"m tested: {', '.join(map(str, features))}.", ""]
    return "\n".join(lines)


def save(rows: list[dict[str, Any]], x: str, stem: Path, title: str, **kw: Any) -> tuple[Path, list[dict[str, Any]]]:
    write_csv(rows, stem.with_suffix(".csv"))
    plot(rows, x, stem.with_suffix(".png"), title, **kw)
    wrote(stem.with_suffix(".csv"), stem.with_suffix(".png"))
    return stem.with_suffix(".png"), rows

