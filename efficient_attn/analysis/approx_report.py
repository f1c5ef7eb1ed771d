"""``efficient-attn-approx``: FAVOR+ approximation-error curves against exact softmax, as CSV + PNG.

    efficient-attn-approx --out results/approx_error            # Performer protocol: L=4096, d=16, 15 draws
    efficient-attn-approx --quick --out /tmp/approx              # a smaller, seconds-long version

Writes error_vs_features.{csv,png} (MSE against m) and error_vs_scale.{csv,png} (MSE against the
input scale at fixed m, with the count of non-finite outputs per point), and logs both to the
active W&B run, if any.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path
from typing import Any

import torch

from .approx import ESTIMATORS, error_vs_features, error_vs_scale


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


def plot(rows: list[dict[str, Any]], x: str, path: Path, title: str,
         ylabel: str = "MSE of attention output vs exact softmax") -> None:
    """Log-log mean MSE per estimator with a ±1 std band; points that were all non-finite are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for est in dict.fromkeys(r["estimator"] for r in rows):
        pts = [r for r in rows if r["estimator"] == est and not math.isnan(r["mse_mean"])]
        if not pts:
            continue
        xs = [r[x] for r in pts]
        mean = [r["mse_mean"] for r in pts]
        lo = [max(m - r["mse_std"], m * 1e-3) for m, r in zip(mean, pts)]
        hi = [m + r["mse_std"] for m, r in zip(mean, pts)]
        bad = sum(r["non_finite"] for r in rows if r["estimator"] == est)
        (line,) = ax.plot(xs, mean, marker="o", ms=3, label=est + (f" ({bad} non-finite)" if bad else ""))
        ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2)
    if x != "layer":
        ax.set_xscale("log", base=2 if x == "num_features" else 10)
    ax.set_yscale("log")
    ax.set_xlabel(X_LABELS[x])
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def log_to_wandb(outputs: dict[str, tuple[Path, list[dict[str, Any]]]]) -> None:
    if "wandb" not in sys.modules:
        return
    import wandb

    if wandb.run is None:
        return
    for name, (png, rows) in outputs.items():
        table = wandb.Table(columns=list(rows[0]), data=[list(r.values()) for r in rows])
        wandb.log({f"approx/{name}": wandb.Image(str(png)), f"approx/{name}_table": table})


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--features", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256, 512])
    p.add_argument("--draws", type=int, default=15, help="independent feature draws per point")
    p.add_argument("--scale", type=float, default=1.0, help="std of q, k entries for the m sweep")
    p.add_argument("--scales", type=float, nargs="+", default=[0.25, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0])
    p.add_argument("--scale-features", type=int, default=256, help="m for the scale sweep")
    p.add_argument("--seed", type=int, default=0, help="seed of q, k, v")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="L=512, 5 draws, 3 m values, 3 scales: seconds")
    p.add_argument("--out", type=Path, default=Path("approx_out"))


def run(a: argparse.Namespace) -> dict[str, tuple[Path, list[dict[str, Any]]]]:
    """The m sweep and the scale sweep on random inputs; returns {name: (png, rows)}."""
    if a.quick:
        a.length, a.draws, a.features, a.scales = 512, 5, [8, 32, 128], [0.5, 1.0, 2.0]
    if a.threads:
        torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    common = dict(length=a.length, dim=a.dim, draws=a.draws, seed=a.seed, estimators=ESTIMATORS)
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


def save(rows: list[dict[str, Any]], x: str, stem: Path, title: str, **kw: Any) -> tuple[Path, list[dict[str, Any]]]:
    write_csv(rows, stem.with_suffix(".csv"))
    plot(rows, x, stem.with_suffix(".png"), title, **kw)
    print(f"wrote {stem}.csv and .png")
    return stem.with_suffix(".png"), rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="FAVOR+ approximation error against exact softmax.")
    add_arguments(p)
    run(p.parse_args(argv))


if __name__ == "__main__":
    main()
