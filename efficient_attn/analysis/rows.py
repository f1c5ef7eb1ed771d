"""How far an attention's own rows are from softmax's on the same queries and keys.

For an attention whose output is an explicit normalized average of the values, out_i = Σ_j P̂_ij v_j, the
rows P̂_i are compared with the exact softmax rows P_i = softmax_j(q_i·k_j/√d) over the same visible keys
(j ≤ i when causal; padded keys never visible), averaged over the query rows that see a key:

- ``kl_softmax_model``: KL(P ‖ P̂) = Σ_j P_ij log(P_ij / P̂_ij); +inf when P̂ puts zero (or negative, trig
  features) weight on a key softmax sees, as a sliding window does outside its band;
- ``kl_model_softmax``: KL(P̂ ‖ P) = Σ_{j: P̂_ij > 0} P̂_ij log(P̂_ij / P_ij); for a sliding window
  −log(softmax mass inside the window), finite;
- ``softmax_mass``: Σ_{j: P̂_ij > 0} P_ij, the softmax mass on the keys the attention weighs (1 for kernels
  with positive features, the mass inside the band for a sliding window).

Rows by kind (:func:`attention_rows`): kernel attentions (``KernelAttention``: linear, favor, hedgehog, taylor,
cosformer) P̂_ij ∝ φ(q_i)·φ(k_j) e^{g_j} (their own ``feature_map``; key log-scales set against each row's
largest visible one); ``sliding_window`` softmax (its own scale) over its band; ``softmax`` its own scale.
Gated and delta-rule recurrences, retention and dot attention weigh values without normalized rows:
"no rows", no number. Others (additive, bilinear) are "not measured". O(L·S) memory: meant for the short
sequences of a validation batch, in float64.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..attention.base import Attention
from ..attention.dot import DotProductAttention
from ..attention.gated import GatedRecurrentAttention
from ..attention.kernel import KernelAttention
from ..attention.retention import RetentionAttention
from ..attention.sliding_window import SlidingWindowAttention
from ..attention.softmax import SoftmaxAttention

NO_ROWS = (GatedRecurrentAttention, RetentionAttention, DotProductAttention)


def visible_keys(length: int, key_padding_mask: Tensor | None, causal: bool, window: int | None = None) -> Tensor:
    """(B or 1, 1, L, S) bool: the keys query i may see (S = L when causal or windowed)."""
    size = key_padding_mask.shape[-1] if key_padding_mask is not None else length
    i = torch.arange(length)[:, None]  # (L, 1)
    j = torch.arange(size)[None, :]  # (1, S)
    seen = torch.ones(length, size, dtype=torch.bool)
    if causal:
        seen = seen & (j <= i)
    if window is not None:
        seen = seen & (i - j < window) & ((j - i < window) | causal)
    seen = seen[None, None]  # (1, 1, L, S)
    if key_padding_mask is not None:
        seen = seen & ~key_padding_mask[:, None, None, :]  # (B, 1, L, S)
    return seen


def softmax_rows(q: Tensor, k: Tensor, visible: Tensor, scale: float | None = None) -> Tensor:
    """(B, H, L, S) softmax(scale · q kᵀ) over the visible keys (0 elsewhere; a row that sees none is 0)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = (q @ k.transpose(-1, -2) * scale).masked_fill(~visible, -math.inf)  # (B, H, L, S)
    return torch.nan_to_num(logits.softmax(-1), nan=0.0)


def kernel_rows(attn: KernelAttention, q: Tensor, k: Tensor, visible: Tensor) -> Tensor:
    """(B, H, L, S) P̂_ij = w_ij / Σ_j w_ij, w_ij = φ(q_i)·φ(k_j) e^{g_j − G_i} over visible keys, G_i the
    largest visible key log-scale of row i (it cancels in the ratio); 0 off the visible keys."""
    phi_q, _ = attn.feature_map(q, is_query=True)  # (B, H, L, M)
    phi_k, log_scale = attn.feature_map(k, is_query=False)  # (B, H, S, M), (B, H, S) or None
    weights = phi_q @ phi_k.transpose(-1, -2)  # (B, H, L, S)
    if log_scale is not None:
        g = log_scale[..., None, :].masked_fill(~visible, -math.inf)  # (B, H, L, S)
        top = g.amax(-1, keepdim=True).clamp_min(-1e300)  # (B, H, L, 1); a row with no key stays finite
        weights = weights * (g - top).exp()
    weights = weights.masked_fill(~visible, 0.0)
    return weights / weights.sum(-1, keepdim=True)


def attention_rows(attn: Attention, q: Tensor, k: Tensor, key_padding_mask: Tensor | None = None,
                   causal: bool = False) -> tuple[str, Tensor | None, Tensor]:
    """(kind, rows P̂ (B, H, L, S) or None, visible (·, 1, L, S)) of ``attn`` on q, k (B, H, L|S, D).
    kind: "kernel", "window", "softmax", "no rows" or "not measured" (rows None)."""
    visible = visible_keys(q.shape[-2], key_padding_mask, causal)
    if isinstance(attn, KernelAttention):
        return "kernel", kernel_rows(attn, q, k, visible), visible
    if isinstance(attn, SlidingWindowAttention):
        band = visible_keys(q.shape[-2], key_padding_mask, causal, attn.window)
        return "window", softmax_rows(q, k, band, attn.scale), visible
    if isinstance(attn, SoftmaxAttention):
        return "softmax", softmax_rows(q, k, visible, attn.scale), visible
    return ("no rows" if isinstance(attn, NO_ROWS) else "not measured"), None, visible


def row_divergences(p: Tensor, p_hat: Tensor, visible: Tensor) -> dict[str, float]:
    """Means over the rows that see a key of KL(P ‖ P̂), KL(P̂ ‖ P) and the P-mass where P̂ > 0 (module
    docstring); P, P̂ (B, H, L, S) rows over the visible keys. KL(P ‖ P̂) is +inf if any visible P̂_ij ≤ 0
    where P_ij > 0 (or P̂ is not finite), nothing clamped."""
    seen = visible.expand_as(p)
    rows = seen.any(-1)  # (B, H, L)
    if not bool(torch.isfinite(p_hat)[seen].all()):
        return {"kl_softmax_model": math.inf, "kl_model_softmax": math.nan, "softmax_mass": math.nan}
    support = seen & (p_hat > 0)  # (B, H, L, S)
    log_p = p.clamp_min(torch.finfo(p.dtype).tiny).log()
    missed = seen & (p > 0) & ~support
    if bool(missed.any()):
        forward = math.inf
    else:
        terms = torch.where(seen & (p > 0), p * (log_p - p_hat.clamp_min(torch.finfo(p.dtype).tiny).log()), 0.0)
        forward = float(terms.sum(-1)[rows].mean())
    back = torch.where(support, p_hat * (p_hat.clamp_min(torch.finfo(p.dtype).tiny).log() - log_p), 0.0)
    mass = torch.where(support, p, 0.0).sum(-1)  # (B, H, L)
    return {"kl_softmax_model": forward, "kl_model_softmax": float(back.sum(-1)[rows].mean()),
            "softmax_mass": float(mass[rows].mean())}


def rows_against_softmax(attn: Attention, q: Tensor, k: Tensor, key_padding_mask: Tensor | None = None,
                         causal: bool = False) -> dict[str, Any]:
    """{"rows": kind, and where the attention has rows, :func:`row_divergences` against softmax at 1/√d}."""
    with torch.no_grad():
        kind, p_hat, visible = attention_rows(attn, q, k, key_padding_mask, causal)
        if p_hat is None:
            return {"rows": kind, "kl_softmax_model": math.nan, "kl_model_softmax": math.nan,
                    "softmax_mass": math.nan}
        return {"rows": kind, **row_divergences(softmax_rows(q, k, visible), p_hat, visible)}
