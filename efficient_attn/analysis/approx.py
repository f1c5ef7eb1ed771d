"""Approximation error of kernelized attention against exact softmax (Performer protocol, Fig. 4).

Every estimate runs the registry's own modules (``create_attention("favor", ...)``), so the curves
describe the code users train with. Inputs are float64; the error is the mean squared error of the
attention *output* against ``softmax`` attention on the same q, k, v, over independent feature draws.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import Tensor

from ..registry import create_attention


@dataclass(frozen=True)
class Estimator:
    """One curve: a registered attention and its options (m is added per point)."""

    label: str
    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    random: bool = True  # False: deterministic features (one draw, no dependence on m)


ESTIMATORS = (
    Estimator("positive / orthogonal", "favor", {"kernel": "softmax", "orthogonal": True}),
    Estimator("positive / iid", "favor", {"kernel": "softmax", "orthogonal": False}),
    Estimator("trig / orthogonal", "favor", {"kernel": "softmax_trig", "orthogonal": True}),
    Estimator("trig / iid", "favor", {"kernel": "softmax_trig", "orthogonal": False}),
    Estimator("relu / orthogonal (other kernel)", "favor", {"kernel": "relu", "orthogonal": True}),
    Estimator("linear elu+1 (other kernel)", "linear", {}, random=False),
)


def sample_qkv(length: int, dim: int, scale: float, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """q, k ~ N(0, scale²) and v ~ N(0, 1), each (1, 1, length, dim) float64."""
    g = torch.Generator().manual_seed(seed)
    shape = (1, 1, length, dim)
    q, k, v = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3))
    return q * scale, k * scale, v


def exact_softmax(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return create_attention("softmax", head_dim=q.shape[-1], num_heads=q.shape[1])(q, k, v)


@dataclass
class Point:
    """Errors of one estimator at one setting over the draws; NaN/Inf outputs are counted, not averaged."""

    estimator: str
    num_features: int
    scale: float
    errors: list[float]
    non_finite: int

    def row(self) -> dict[str, Any]:
        finite = self.errors
        return {
            "estimator": self.estimator,
            "num_features": self.num_features,
            "scale": self.scale,
            "draws": len(finite) + self.non_finite,
            "mse_mean": statistics.mean(finite) if finite else math.nan,
            "mse_std": statistics.stdev(finite) if len(finite) > 1 else 0.0,
            "non_finite": self.non_finite,
        }


def measure(
    est: Estimator, q: Tensor, k: Tensor, v: Tensor, exact: Tensor, num_features: int, draws: int, scale: float,
    causal: bool = False,
) -> Point:
    """MSE of ``est`` against ``exact`` over ``draws`` feature draws (seeds 0..draws-1)."""
    errors, bad = [], 0
    for draw in range(draws if est.random else 1):
        kwargs = {**est.kwargs, "num_features": num_features, "seed": draw} if est.name == "favor" else est.kwargs
        attn = create_attention(est.name, head_dim=q.shape[-1], num_heads=q.shape[1], **kwargs).double().eval()
        with torch.no_grad():
            out = attn(q, k, v, causal=causal)  # (1, H, L, Dv)
        if torch.isfinite(out).all():
            errors.append(float((out - exact).pow(2).mean()))
        else:
            bad += 1
    return Point(est.label, num_features, scale, errors, bad)


def error_vs_features(
    features: Iterable[int], *, length: int = 4096, dim: int = 16, draws: int = 15, scale: float = 1.0,
    estimators: Iterable[Estimator] = ESTIMATORS, seed: int = 0,
) -> list[dict[str, Any]]:
    """Rows of mean ± std MSE against m for every estimator (one fixed q, k, v)."""
    q, k, v = sample_qkv(length, dim, scale, seed)
    exact = exact_softmax(q, k, v)
    return [measure(e, q, k, v, exact, m, draws, scale).row() for e in estimators for m in features]


def error_vs_scale(
    scales: Iterable[float], *, num_features: int = 256, length: int = 4096, dim: int = 16, draws: int = 15,
    estimators: Iterable[Estimator] = ESTIMATORS, seed: int = 0,
) -> list[dict[str, Any]]:
    """Rows of MSE against the input scale (‖q‖, ‖k‖ ∝ scale, logits ∝ scale²) at fixed m."""
    rows = []
    for scale in scales:
        q, k, v = sample_qkv(length, dim, scale, seed)
        exact = exact_softmax(q, k, v)
        rows += [measure(e, q, k, v, exact, num_features, draws, scale).row() for e in estimators]
    return rows
