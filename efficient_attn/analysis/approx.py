"""Approximation error of kernelized attention against exact softmax (Performer protocol, Fig. 4).

Every estimate runs the registry's own modules (``create_attention("favor", ...)``), so the curves
describe the code users train with. Inputs are float64. Two errors per feature draw, against
``softmax`` attention on the same q, k, v:

- MSE of the attention *output* (all L rows);
- KL(P ‖ P̂) between the exact attention rows P_i = softmax(q_i kᵀ/√d) and the estimated rows
  P̂_i = φ(q_i)·φ(k_j) / Σ_j φ(q_i)·φ(k_j) (the module's own ``feature_map``, key log-scales
  applied), averaged over query rows (how Hedgehog, Zhang et al. 2024, judges an approximation).
  It is computed on the first ``kl_rows`` query rows only (rows are i.i.d., so this estimates the
  mean over all rows; at L = 4096 the full L×L matrix for every draw would cost an estimated ~15×
  the rest of the sweep).
  A row whose P̂ has an entry ≤ 0 (trig features' weights are signed) has infinite KL; such a draw
  is counted in ``kl_non_finite`` and left out of ``kl_mean``, nothing is clamped.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import Tensor

from ..registry import attention_options, create_attention
from . import KL_ROWS  # query rows the KL is measured on (defined without torch, for the CLI)


@dataclass(frozen=True)
class Estimator:
    """One curve: a registered attention and its options (m is added per point)."""

    label: str
    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    random: bool = True  # False: deterministic features (one draw, no dependence on m)


def estimator(name: str) -> Estimator:
    """Any registered attention (a user's own too) with its default options, as a curve: random when it
    takes a ``seed`` (one draw per seed), else one draw; m is passed when it takes ``num_features``."""
    return Estimator(name, name, {}, random="seed" in attention_options(name))


ESTIMATORS = (
    Estimator("positive / orthogonal", "favor", {"kernel": "softmax", "orthogonal": True}),
    Estimator("positive / iid", "favor", {"kernel": "softmax", "orthogonal": False}),
    Estimator("positive / simplex", "favor", {"kernel": "softmax", "projection": "simplex"}),
    Estimator("hyperbolic / orthogonal", "favor", {"kernel": "softmax_hyp", "orthogonal": True}),
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
    """Errors of one estimator at one setting over the draws; NaN/Inf outputs are counted, not averaged
    (``non_finite`` for the output MSE, ``kl_non_finite`` for the KL)."""

    estimator: str
    num_features: int
    scale: float
    errors: list[float]
    non_finite: int
    kls: list[float] = field(default_factory=list)
    kl_non_finite: int = 0

    def row(self) -> dict[str, Any]:
        finite, kls = self.errors, self.kls
        return {
            "estimator": self.estimator,
            "num_features": self.num_features,
            "scale": self.scale,
            "draws": len(finite) + self.non_finite,
            "mse_mean": statistics.mean(finite) if finite else math.nan,
            "mse_std": statistics.stdev(finite) if len(finite) > 1 else 0.0,
            "non_finite": self.non_finite,
            "kl_mean": statistics.mean(kls) if kls else math.nan,
            "kl_std": statistics.stdev(kls) if len(kls) > 1 else 0.0,
            "kl_non_finite": self.kl_non_finite,
        }


def estimated_weights(attn: Any, q: Tensor, k: Tensor) -> Tensor:
    """(B, H, L, S) unnormalised weights φ(q_i)·φ(k_j)·e^{g_j − G} of a kernel attention (its own
    ``feature_map``; G = the largest key log-scale, which cancels in each row's normalisation)."""
    phi_q, _ = attn.feature_map(q, is_query=True)  # (B, H, L, M)
    phi_k, log_scale = attn.feature_map(k, is_query=False)  # (B, H, S, M), (B, H, S) or None
    if log_scale is not None:
        phi_k = phi_k * (log_scale - log_scale.amax(-1, keepdim=True)).exp()[..., None]
    return phi_q @ phi_k.transpose(-1, -2)


def kl_divergence(log_p: Tensor, weights: Tensor, visible: Tensor | None = None) -> float:
    """Mean over rows of KL(P_i ‖ P̂_i), P̂_i = weights_i / Σ_j weights_ij; +inf if any visible P̂_ij ≤ 0
    (or is not finite). log_p (…, L, S) exact log-probabilities (−inf where not visible); visible
    (L, S) bool or None (all)."""
    if visible is not None:
        weights = weights.masked_fill(~visible, 0.0)
    p_hat = weights / weights.sum(-1, keepdim=True)  # (…, L, S)
    seen = torch.ones_like(p_hat, dtype=torch.bool) if visible is None else visible.expand_as(p_hat)
    if not bool(((p_hat > 0) & torch.isfinite(p_hat))[seen].all()):
        return math.inf
    p = log_p.exp()
    terms = torch.where(seen, p * (log_p - p_hat.log()), torch.zeros_like(p))
    return float(terms.sum(-1).mean())


def exact_log_probs(q: Tensor, k: Tensor, causal: bool = False) -> tuple[Tensor, Tensor | None]:
    """log softmax(q kᵀ/√d) (…, L, S) and the visible (L, S) mask (None: all keys; causal: j ≤ i)."""
    logits = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    visible = None
    if causal:
        visible = torch.ones(logits.shape[-2:], dtype=torch.bool).tril()  # (L, S): rows are the first L queries
        logits = logits.masked_fill(~visible, -math.inf)
    return torch.log_softmax(logits, dim=-1), visible


def measure(
    est: Estimator, q: Tensor, k: Tensor, v: Tensor, exact: Tensor, num_features: int, draws: int, scale: float,
    causal: bool = False, kl_rows: int = KL_ROWS,
) -> Point:
    """MSE of ``est`` against ``exact`` and KL of its attention rows (the first ``kl_rows`` queries;
    0: no KL) over ``draws`` feature draws (seeds 0..draws-1)."""
    errors, bad, kls, kl_bad = [], 0, [], 0
    q_kl = q[..., :kl_rows, :]
    log_p, visible = exact_log_probs(q_kl, k, causal) if kl_rows else (None, None)
    options = attention_options(est.name)
    for draw in range(draws if est.random else 1):
        kwargs = dict(est.kwargs)
        kwargs |= {"num_features": num_features} if "num_features" in options else {}
        kwargs |= {"seed": draw} if "seed" in options else {}
        attn = create_attention(est.name, head_dim=q.shape[-1], num_heads=q.shape[1], **kwargs).double().eval()
        rows_kl = kl_rows if hasattr(attn, "feature_map") else 0  # KL needs the weights: kernel attentions only
        with torch.no_grad():
            out = attn(q, k, v, causal=causal)  # (1, H, L, Dv)
            kl = kl_divergence(log_p, estimated_weights(attn, q_kl, k), visible) if rows_kl else math.nan
        if torch.isfinite(out).all():
            errors.append(float((out - exact).pow(2).mean()))
        else:
            bad += 1
        if math.isfinite(kl):
            kls.append(kl)
        elif rows_kl:
            kl_bad += 1
    return Point(est.label, num_features, scale, errors, bad, kls, kl_bad)


def error_vs_features(
    features: Iterable[int], *, length: int = 4096, dim: int = 16, draws: int = 15, scale: float = 1.0,
    estimators: Iterable[Estimator] = ESTIMATORS, seed: int = 0, kl_rows: int = KL_ROWS,
) -> list[dict[str, Any]]:
    """Rows of mean ± std MSE and KL against m for every estimator (one fixed q, k, v)."""
    q, k, v = sample_qkv(length, dim, scale, seed)
    exact = exact_softmax(q, k, v)
    return [measure(e, q, k, v, exact, m, draws, scale, kl_rows=kl_rows).row() for e in estimators for m in features]


def error_vs_scale(
    scales: Iterable[float], *, num_features: int = 256, length: int = 4096, dim: int = 16, draws: int = 15,
    estimators: Iterable[Estimator] = ESTIMATORS, seed: int = 0, kl_rows: int = KL_ROWS,
) -> list[dict[str, Any]]:
    """Rows of MSE and KL against the input scale (‖q‖, ‖k‖ ∝ scale, logits ∝ scale²) at fixed m."""
    rows = []
    for scale in scales:
        q, k, v = sample_qkv(length, dim, scale, seed)
        exact = exact_softmax(q, k, v)
        rows += [measure(e, q, k, v, exact, num_features, draws, scale, kl_rows=kl_rows).row() for e in estimators]
    return rows
