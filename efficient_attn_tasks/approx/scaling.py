"""Why dot products are scaled by 1/√d_k (Vaswani et al. 2017, footnote 4), measured: ``--study sqrt_dk``.

With q, k entries iid N(0, 1), q·k has variance d_k: unscaled logits saturate the softmax, and its Jacobian
J = diag(p) − ppᵀ, hence every gradient through it, shrinks toward 0; dividing by √d_k keeps the variance at 1.
Per d_k and scaling, in float64, this module measures the logit variance, the largest probability, the entropy
and ‖J‖_F over random draws, and plots them against d_k.
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any

from efficient_attn_tasks.plots import Line, Panel, error_bars

if TYPE_CHECKING:  # torch loads when a study runs, so the command's --help does not wait for it
    import torch
    from torch import Tensor

DIMS = (16, 32, 64, 128, 256)
SCALINGS = ("unscaled", "scaled")  # logits q·k and q·k/√d_k
STATS = ("logit_var", "max_prob", "entropy", "grad_norm", "grad_norm_median")  # grad_norm: ‖J‖_F, query mean
COLUMNS = ("d_k", "scaling", "queries", "keys", "draws",
           *(f"{s}_{part}" for s in STATS for part in ("mean", "std")))


def softmax_jacobian_norm(p: Tensor) -> Tensor:
    """Frobenius norm of the softmax Jacobian J = diag(p) − ppᵀ for each row of p (…, S) -> (…).

    ‖J‖²_F = Σ_j (p_j − p_j²)² + Σ_{j≠l} p_j² p_l² = Σ p² − 2 Σ p³ + (Σ p²)², in O(S) per row.
    """
    p2 = p.pow(2).sum(-1)
    p3 = p.pow(3).sum(-1)
    return (p2 - 2 * p3 + p2.pow(2)).clamp_min(0).sqrt()


def softmax_stats(logits: Tensor) -> dict[str, Tensor]:
    """Per-draw statistics of logits (draws, L, S): each a (draws,) tensor, query means where per query."""
    log_p = logits.log_softmax(-1)  # (draws, L, S)
    p = log_p.exp()
    jac = softmax_jacobian_norm(p)  # (draws, L)
    return {
        "logit_var": logits.flatten(1).var(-1),  # over the L·S entries of each draw
        "max_prob": p.amax(-1).mean(-1),
        "entropy": -(p * log_p).sum(-1).mean(-1),  # p = 0 contributes 0: log_p stays finite
        "grad_norm": jac.mean(-1),
        "grad_norm_median": jac.median(-1).values,
    }


def unscaled_logits(d_k: int, queries: int, keys: int, draws: int, generator: torch.Generator) -> Tensor:
    """q·k for q (draws, L, d_k), k (draws, S, d_k) with iid N(0, 1) entries: (draws, L, S) float64."""
    import torch

    q = torch.randn(draws, queries, d_k, generator=generator, dtype=torch.float64)
    k = torch.randn(draws, keys, d_k, generator=generator, dtype=torch.float64)
    return q @ k.transpose(-1, -2)  # (draws, L, S)


def sqrt_dk_study(dims: tuple[int, ...] = DIMS, queries: int = 256, keys: int = 256, draws: int = 20,
                  seed: int = 0) -> list[dict[str, Any]]:
    """One row per d_k × scaling (columns :data:`COLUMNS`): mean and std over draws of each statistic.

    Both scalings of one d_k see the same q, k, so their difference is the scaling alone.
    """
    import torch

    if draws < 2:
        raise ValueError(f"draws must be >= 2 for a std over draws, got {draws}")
    rows = []
    for d_k in dims:
        logits = unscaled_logits(d_k, queries, keys, draws, torch.Generator().manual_seed(seed + d_k))
        for scaling in SCALINGS:
            z = logits if scaling == "unscaled" else logits / math.sqrt(d_k)
            rows.append(_row(d_k, scaling, queries, keys, softmax_stats(z)))
    return rows


def _row(d_k: int, scaling: str, queries: int, keys: int, per_draw: dict[str, Tensor]) -> dict[str, Any]:
    row: dict[str, Any] = {"d_k": d_k, "scaling": scaling, "queries": queries, "keys": keys,
                           "draws": len(per_draw["logit_var"])}
    for name in STATS:
        values = per_draw[name].tolist()
        row[f"{name}_mean"] = statistics.mean(values)
        row[f"{name}_std"] = statistics.stdev(values)
    return row


# ----------------------------------------------------------------------------- figure
PANELS = (  # (statistics, y label, log y); a second statistic is drawn dashed
    (("logit_var",), "variance of logits", True),
    (("max_prob",), "mean max softmax probability", False),
    (("entropy",), "mean softmax entropy (nats)", False),
    (("grad_norm", "grad_norm_median"), "‖softmax Jacobian‖_F per query", True),
)


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    """One panel per statistic against d_k (log₂ x), unscaled and scaled, ±1 std over draws."""
    dims = sorted({r["d_k"] for r in rows})
    panels = []
    for stats, ylabel, log_y in PANELS:
        panel = Panel(xlabel="d_k (log₂ scale)", ylabel=ylabel + (" (log scale)" if log_y else ""),
                      yscale="log" if log_y else "linear")
        for scaling, index in zip(SCALINGS, (3, 0)):  # red unscaled, blue scaled
            pts = sorted((r for r in rows if r["scaling"] == scaling), key=lambda r: r["d_k"])
            for stat, ls in zip(stats, ("-", "--")):
                panel.lines.append(Line(_label(scaling, stat, len(stats)), [r["d_k"] for r in pts],
                                        [r[f"{stat}_mean"] for r in pts], index=index,
                                        yerr=[r[f"{stat}_std"] for r in pts], linestyle=ls))
        _references(panel, stats[0], dims, rows[0]["keys"])
        panels.append(panel)
    return error_bars(panels, path, title)


def _label(scaling: str, stat: str, stats_in_panel: int) -> str:
    name = "q·k" if scaling == "unscaled" else "q·k/√d_k"
    if stats_in_panel == 1:
        return name
    return f"{name}, {'median' if stat.endswith('_median') else 'mean'} over queries"


def _references(panel: Panel, stat: str, dims: list[int], keys: int) -> None:
    """Dotted theory lines: variance d_k and 1; uniform attention's max-prob 1/S and entropy log S."""
    if stat == "logit_var":
        panel.guides.append(Line("d_k", dims, dims))
        panel.hlines.append((1.0, ""))
    elif stat == "max_prob":
        panel.hlines.append((1 / keys, "uniform 1/S"))
    elif stat == "entropy":
        panel.hlines.append((math.log(keys), "uniform log S"))


def run(a: argparse.Namespace) -> dict[str, tuple[Path, list[dict[str, Any]]]]:
    """The study, written to <out>/sqrt_dk.{csv,png} and logged to the active W&B run, if any."""
    import torch

    from efficient_attn_tasks.approx.report import log_to_wandb, write_csv
    from efficient_attn_tasks.commands.cli import wrote

    if a.threads:
        torch.set_num_threads(a.threads)
    keys = a.keys or a.length
    rows = sqrt_dk_study(tuple(a.dims), queries=a.length, keys=keys, draws=a.draws, seed=a.seed)
    a.out.mkdir(parents=True, exist_ok=True)
    csv_path, png = a.out / "sqrt_dk.csv", a.out / "sqrt_dk.png"
    write_csv(rows, csv_path)
    plot(rows, png, f"q, k ~ N(0, I), L={a.length}, S={keys}, {a.draws} draws, float64")
    wrote(csv_path, png)
    outputs = {"sqrt_dk": (png, rows)}
    log_to_wandb(outputs)
    return outputs
