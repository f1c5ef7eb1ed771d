"""FAVOR+ approximation error against exact softmax on random inputs: the default study of ``efficient-attn-approx``.

Owns the sweeps over the number of features m and over the input scale, their CSV and PNG (a panel for the MSE
of the attention output, one for KL(P ‖ P̂) of attention rows, each mean ± std over draws with the non-finite
draws counted; :mod:`efficient_attn.analysis.approx` computes them) and their logging to an active W&B run.
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
from efficient_attn_tasks.plots import Line, Panel, error_bands


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


X_LABELS = {
    "num_features": "random features m",
    "scale": "input scale (std of q, k entries)",
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
    """The m sweep and the scale sweep on random inputs; returns {name: (png, rows)}."""
    import torch

    from efficient_attn.analysis.approx import ESTIMATORS, error_vs_features, error_vs_scale, estimator
    from efficient_attn.registry import get_attention_class, import_attentions

    import_attentions(getattr(a, "imports", []))
    extra = [name for name in getattr(a, "attentions", "").split(",") if name]
    for name in extra:
        get_attention_class(name)  # unknown names fail here, with the registered ones listed

    if a.quick:
        a.length, a.draws, a.features, a.scales = 512, 5, [8, 32, 128], [0.5, 1.0, 2.0]
    if a.threads:
        torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    common = dict(length=a.length, dim=a.dim, draws=a.draws, seed=a.seed, kl_rows=a.kl_rows,
                  estimators=[*ESTIMATORS, *map(estimator, extra)])
    by_m = error_vs_features(a.features, scale=a.scale, **common)
    by_scale = error_vs_scale(a.scales, num_features=a.scale_features, **common)
    outputs = {}
    for name, rows, x, title in (
        ("error_vs_features", by_m, "num_features", f"L={a.length}, d={a.dim}, scale={a.scale}, {a.draws} draws"),
        ("error_vs_scale", by_scale, "scale", f"L={a.length}, d={a.dim}, m={a.scale_features}, {a.draws} draws"),
    ):
        outputs[name] = save(rows, x, a.out / name, title)
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


def save(rows: list[dict[str, Any]], x: str, stem: Path, title: str, **kw: Any) -> tuple[Path, list[dict[str, Any]]]:
    write_csv(rows, stem.with_suffix(".csv"))
    plot(rows, x, stem.with_suffix(".png"), title, **kw)
    wrote(stem.with_suffix(".csv"), stem.with_suffix(".png"))
    return stem.with_suffix(".png"), rows

