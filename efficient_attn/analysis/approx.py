"""Approximation error of kernelized attention against exact softmax (after the Performer paper's Fig. 4).

:func:`error_grid` is the study: every sample draws a fresh input q, k, v *and* fresh features, over a grid
of logit scales × feature counts m, next to two baselines that ignore the features, the uniform average
(mean of v over the visible keys, ignoring q and k) and the exact rows' entropy (against its maximum log S),
which say when exact rows are near-uniform. :func:`error_vs_features` and :func:`error_vs_scale` keep one
fixed input (q, k entries with std ``scale``: logit std scale²) and vary the feature draws only. Every estimate
runs the registry's own modules (``create_attention("favor", ...)``), so the curves describe the code users
train with. Inputs are float64. Two errors per sample, against ``softmax`` attention on the same q, k, v:

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


def sample_inputs(length: int, dim: int, logit_std: float, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """q, k ~ N(0, logit_std) entries (std √logit_std) and v ~ N(0, 1), each (1, 1, length, dim) float64: the
    logits q·k/√d then have std ``logit_std`` over random q, k (Var q·k = d·logit_std²)."""
    return sample_qkv(length, dim, math.sqrt(logit_std), seed)


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


def uniform_baseline(log_p: Tensor, v: Tensor, exact: Tensor, visible: Tensor | None = None) -> dict[str, float]:
    """The estimate that ignores q and k, out_i = mean of v_j over the visible keys, and the exact rows' entropy.

    ``mse``: of that output against ``exact`` (all L rows); ``entropy``: mean over the rows of ``log_p``
    (…, R, S; the first R queries) of H(P_i); ``entropy_max``: the mean of log n_i (n_i visible keys);
    ``kl``: mean of KL(P_i ‖ uniform) = log n_i − H(P_i) on the same rows. visible (L, S) bool or None (all)."""
    if visible is None:
        out = v.mean(-2, keepdim=True).expand_as(exact)  # (B, H, L, Dv)
        n = torch.full(log_p.shape[-2:-1], float(v.shape[-2]), dtype=v.dtype)  # (R,)
    else:
        weights = visible.to(v.dtype)  # (L, S)
        out = weights @ v / weights.sum(-1, keepdim=True)  # (B, H, L, Dv)
        n = weights[: log_p.shape[-2]].sum(-1)  # (R,)
    p = log_p.exp()
    entropy = -torch.where(p > 0, p * log_p, torch.zeros_like(p)).sum(-1)  # (…, R)
    return {"mse": float((out - exact).pow(2).mean()), "entropy": float(entropy.mean()),
            "entropy_max": float(n.log().mean()), "kl": float((n.log() - entropy).mean())}


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


@dataclass
class Cell:
    """One estimator at one (logit std, m) over the samples (each a fresh input and fresh features)."""

    estimator: str
    num_features: int
    scale: float
    errors: list[float] = field(default_factory=list)
    non_finite: int = 0
    kls: list[float] = field(default_factory=list)
    kl_non_finite: int = 0

    def add(self, mse: float, kl: float, has_kl: bool) -> None:
        if math.isfinite(mse):
            self.errors.append(mse)
        else:
            self.non_finite += 1
        if math.isfinite(kl):
            self.kls.append(kl)
        elif has_kl:
            self.kl_non_finite += 1


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return (statistics.mean(xs) if xs else math.nan), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def error_grid(
    scales: Iterable[float], features: Iterable[int], *, length: int = 4096, dim: int = 16, samples: int = 15,
    estimators: Iterable[Estimator] = ESTIMATORS, seed: int = 0, kl_rows: int = KL_ROWS,
) -> list[dict[str, Any]]:
    """Rows of MSE and KL, mean ± std over ``samples``, for every logit std × m × estimator, each with the
    baselines of its logit std (uniform average's MSE and KL, exact rows' entropy and its maximum).

    ``scales`` are logit stds: q, k entries have std √scale so that q·k/√d has std ``scale``
    (:func:`sample_inputs`; ``logit_std_measured`` is the std of the logits actually drawn, on the KL rows).
    Sample s draws its q, k, v with seed ``seed * 1000 + s`` (the same normal draw, rescaled, at every
    logit std) and its features with ``seed = s``; a deterministic estimator has one value per sample.
    The KL and the entropy are taken on the first ``kl_rows`` query rows (rows are i.i.d.)."""
    estimators, features = list(estimators), list(features)
    rows = []
    for scale in scales:
        cells = {(e.label, m): Cell(e.label, m, scale) for e in estimators for m in features}
        base: dict[str, list[float]] = {"mse": [], "kl": [], "entropy": [], "entropy_max": [], "logit_std": []}
        for s in range(samples):
            q, k, v = sample_inputs(length, dim, scale, seed * 1000 + s)
            exact = exact_softmax(q, k, v)
            q_kl = q[..., : max(kl_rows, 1), :]  # the entropy needs at least one row
            log_p, visible = exact_log_probs(q_kl, k)
            for key, value in uniform_baseline(log_p, v, exact, visible).items():
                base[key].append(value)
            base["logit_std"].append(float((q_kl @ k.transpose(-1, -2)).std() * dim**-0.5))
            for e in estimators:
                options = attention_options(e.name)
                done: tuple[float, float] | None = None
                for m in features:
                    if done is None or "num_features" in options:
                        kwargs = dict(e.kwargs)
                        kwargs |= {"num_features": m} if "num_features" in options else {}
                        kwargs |= {"seed": s} if "seed" in options else {}
                        attn = create_attention(e.name, head_dim=dim, num_heads=1, **kwargs).double().eval()
                        has_kl = bool(kl_rows) and hasattr(attn, "feature_map")
                        with torch.no_grad():
                            out = attn(q, k, v)  # (1, 1, L, Dv)
                            kl = kl_divergence(log_p, estimated_weights(attn, q_kl, k), visible) if has_kl else math.nan
                        mse = float((out - exact).pow(2).mean()) if torch.isfinite(out).all() else math.inf
                        done = (mse, kl)
                    cells[e.label, m].add(*done, has_kl)
        stats = {key: _mean_std(xs) for key, xs in base.items()}
        for cell in cells.values():
            mse, kl = _mean_std(cell.errors), _mean_std(cell.kls)
            rows.append({
                "estimator": cell.estimator, "num_features": cell.num_features, "scale": scale,
                "input_std": math.sqrt(scale), "logit_std_measured": stats["logit_std"][0], "samples": samples,
                "mse_mean": mse[0], "mse_std": mse[1], "non_finite": cell.non_finite,
                "kl_mean": kl[0], "kl_std": kl[1], "kl_non_finite": cell.kl_non_finite,
                "uniform_mse_mean": stats["mse"][0], "uniform_mse_std": stats["mse"][1],
                "uniform_kl_mean": stats["kl"][0], "uniform_kl_std": stats["kl"][1],
                "entropy_mean": stats["entropy"][0], "entropy_std": stats["entropy"][1],
                "entropy_max": stats["entropy_max"][0],
            })
    return rows
