"""Precision and normalisation helpers shared by the kernel attentions and the fused FAVOR+ path."""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

PADDED_LOG_SCALE = -1e30  # below any real key's log-scale; finite, so differences stay defined


def upcast(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v in float32 (float64 stays float64)."""
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.to(dtype), k.to(dtype), v.to(dtype)


def upcast_call(fn: Callable[..., Tensor], q: Tensor, k: Tensor, v: Tensor, *args: Any) -> Tensor:
    """fn(q, k, v, *args) on :func:`upcast` inputs with autocast off; the result in v's dtype."""
    with torch.autocast(q.device.type, enabled=False):
        out = fn(*upcast(q, k, v), *args)
    return out.to(v.dtype)


def upcast_with_ones(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k in float32 (float64 stays float64); v with a column of ones appended: (…, S, Dv+1)."""
    q, k, v = upcast(q, k, v)
    return q, k, F.pad(v, (0, 1), value=1.0)


def with_ones(v: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
    """v (B, H, S, Dv) -> [v, 1] (B, H, S, Dv+1), rows of padded keys (mask (B, S)) all zero (v is zero there
    already; this drops their normalizer too)."""
    v1 = F.pad(v, (0, 1), value=1.0)  # (B, H, S, Dv+1)
    return v1 if key_padding_mask is None else v1.masked_fill(key_padding_mask[:, None, :, None], 0.0)


def scale_values(v1: Tensor, log_scale: Tensor | None) -> Tensor:
    """Non-causal: v1 (B, H, S, Dv+1) rows times e^{g_j − G}, G the largest log-scale of the (b, h)."""
    if log_scale is None:
        return v1
    weights = (log_scale - log_scale.amax(-1, keepdim=True)).exp()  # (B, H, S), ≤ 1
    return v1 * weights[..., None]


def normalize(out1: Tensor) -> Tensor:
    """(…, L, Dv+1) numerators and normalizer -> (…, L, Dv); a query seeing no key gets 0, not NaN."""
    num, den = out1[..., :-1], out1[..., -1:]  # (…, L, Dv), (…, L, 1)
    return num / torch.where(den == 0, 1.0, den)
