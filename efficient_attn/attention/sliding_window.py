"""Sliding-window (local) softmax attention, as in Longformer (Beltagy et al. 2020) and Mistral 7B (Jiang et al.
2023); the window ``window`` counts keys as stated in the class docstring, not as either paper does."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops.numerics import upcast, upcast_call
from ..registry import register_attention
from .base import Attention, check_inputs, check_step


@register_attention("sliding_window")
class SlidingWindowAttention(Attention):
    """Softmax attention over a band of w = ``window`` keys around each query.

    out_i = Σ_{j∈W(i)} softmax_j(scale · q_i·k_j) v_j,  W(i) = {j : |i − j| < w} (bidirectional) or
    {j : i − w < j ≤ i} (causal: the query itself and the w − 1 keys before it); scale = 1/√d by default.
    So a query away from the ends sees w keys causal (i−w+1..i) and 2w − 1 bidirectional (w − 1 per side).
    Other conventions: Longformer's window w is w/2 keys per side (about w + 1 in all); FlashAttention's
    ``window_size=(left, right)`` sees keys i − left..i + right (``(w − 1, 0)`` is causal w here,
    ``(w − 1, w − 1)`` bidirectional w here); Hugging Face's Mistral ``sliding_window`` = W gives at most W
    keys in its eager path but W + 1 through FlashAttention (transformers issue 29623).
    Blocked: rows in blocks of c = min(w, 32) queries (c = w where autograd records: larger blocks speed the
    backward), each against the span of keys its rows' bands cover
    (c + w − 1 causal, c + 2w − 2 bidirectional) under a banded mask built once per shape: O(L·w·d) time,
    O(L·w) memory, and no (L, L) tensor ever exists. Row max subtracted (softmax); a row that sees no key
    outputs zeros.
    Masks: key padding yes; causal yes. Self-attention only: query i and key i are the same position,
    so cross-attention (S ≠ L) raises. Decoding keeps the last w keys/values (a cache bounded by w).
    Computed in float32 (float64 stays float64), also under autocast; the output comes in v's dtype.
    """

    supports_cross_attention = False

    def __init__(self, head_dim: int, num_heads: int, *, window: int = 64, scale: float | None = None) -> None:
        super().__init__(head_dim, num_heads)
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise ValueError(f"window must be a positive int, got {window!r}")
        if scale is not None and not scale > 0:
            raise ValueError(f"scale must be positive, got {scale!r}")
        self.window = window
        self.scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, causal: bool
    ) -> Tensor:
        return upcast_call(banded_softmax_attention, q, k, v, key_padding_mask, causal, self.window, self.scale)

    def prefill(self, k: Tensor, v: Tensor) -> dict[str, Tensor]:
        """The decoding state after positions 0..t−1: the last w keys/values, as stepping keeps them."""
        check_inputs(k, k, v, None, True, self.num_heads, self.head_dim)
        start = max(k.shape[2] - self.window, 0)
        return {"k": k[:, :, start:], "v": v[:, :, start:]}  # (B, H, min(t, w), ·)

    def decode_step(
        self, q: Tensor, k: Tensor, v: Tensor, state: dict[str, Tensor] | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """One causal step against the last w keys; the state is those keys/values, (B, H, ≤ w, ·)."""
        check_step(q, k, v)
        check_inputs(q, k, v, None, True, self.num_heads, self.head_dim)
        if state is not None:
            k = torch.cat([state["k"], k], dim=2)[:, :, -self.window :]  # (B, H, ≤w, D): what this query sees
            v = torch.cat([state["v"], v], dim=2)[:, :, -self.window :]  # (B, H, ≤w, Dv)
        with torch.autocast(q.device.type, enabled=False):
            q32, k32, v32 = upcast(q, k, v)
            weights = (q32 @ k32.transpose(-1, -2) * self.scale).softmax(-1)  # (B, H, 1, ≤w)
            out = weights @ v32  # (B, H, 1, Dv)
        return out.to(v.dtype), {"k": k, "v": v}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, window={self.window}, scale={self.scale:.4g}"


def banded_softmax_attention(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, causal: bool, window: int, scale: float
) -> Tensor:
    """q, k (B, H, L, D), v (B, H, L, Dv) -> (B, H, L, Dv), softmax over each query's band of keys.

    w = min(window, L) (a window past the sequence's length sees all of it). Blocks of c = min(w, BLOCK)
    queries (c = w where autograd records: the backward's matmuls run faster on the larger blocks); block
    n's rows meet the span of keys their bands cover, positions n·c − (w − 1) to n·c + c − 1 (+ w − 1
    unless causal): a (c, span) score block, span = c + w − 1 causal, c + 2w − 2
    bidirectional, of which each row's band is w or 2w − 1 keys. The heads lie end to end as one
    sequence, so every span is a window of one strided view that the batched matmul reads in place (no
    copy of the keys per block); a span reaching into a neighbouring head, or past the sequence, is masked.
    """
    b, h, length, d = q.shape
    dv = v.shape[-1]
    w = min(window, length)
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    c = w if grad else min(w, BLOCK)  # queries per block
    n = -(-length // c)  # number of query blocks
    padded = n * c
    reach = w if causal else 2 * w - 1  # keys in a band: columns a .. a + reach − 1 of row a's span
    span = c + reach - 1
    left, right = w - 1, reach - w  # keys a span holds before its block and after it
    if padded != length:
        q, k, v = (F.pad(t, (0, 0, 0, padded - length)) for t in (q, k, v))  # (B, H, N·c, ·)
    qb = q.reshape(b * h * n, c, d)  # (B·H·N, c, D)
    kb = _end_to_end(k, left, right).unfold(0, span, c)  # (B·H·N, D, span)
    vb = _end_to_end(v, left, right).unfold(0, span, c)  # (B·H·N, Dv, span)
    blocked = _outside_band(length, padded, c, span, left, q.device)  # (N, c, span)
    empty = None
    if key_padding_mask is not None:
        pad = F.pad(key_padding_mask, (left, padded - length + right), value=True).unfold(1, span, c)  # (B, N, span)
        blocked = blocked | pad[:, None, :, None, :]  # (B, 1, N, c, span)
        empty = blocked.all(-1, keepdim=True)  # (B, 1, N, c, 1): rows that see no key
        blocked = blocked & ~empty  # empty rows let through to their whole span (finite), zeroed afterwards
    zero = qb.new_zeros(()).expand(b * h * n, c, span)  # not read: beta = 0
    scores = torch.baddbmm(zero, qb, kb, beta=0.0, alpha=scale).view(b, h, n, c, span)  # (B, H, N, c, span)
    scores.masked_fill_(blocked, float("-inf"))
    if torch.is_grad_enabled() and scores.requires_grad:
        weights = scores.softmax(-1)  # row max subtracted inside
    else:  # no autograd: in place, one (B, H, N, c, span) tensor fewer
        weights = torch.softmax(scores, -1, out=scores)
    out = torch.bmm(weights.view(b * h * n, c, span), vb.transpose(1, 2)).view(b, h, n, c, dv)  # (B, H, N, c, Dv)
    if empty is not None:
        out = out.masked_fill(empty, 0.0)
    return out.view(b, h, padded, dv)[:, :, :length]  # (B, H, L, Dv)


def _end_to_end(x: Tensor, left: int, right: int) -> Tensor:
    """(B, H, L, D) -> (left + B·H·L + right, D): the heads end to end between zero rows (one copy: cat)."""
    zeros = x.new_zeros(left + right, x.shape[-1])  # (left + right, D)
    return torch.cat([zeros[:left], x.reshape(-1, x.shape[-1]), zeros[left:]])  # (left + B·H·L + right, D)


BLOCK = 32  # queries per block without autograd: at w = 64 on CPU, a faster forward than blocks of 16, 64 or 128
_MASKS: dict[tuple, Tensor] = {}  # the band masks of recent shapes (at most _MASKS_KEPT)
_MASKS_KEPT = 8


def _outside_band(length: int, padded: int, c: int, span: int, left: int, device: torch.device) -> Tensor:
    """(N, c, span) bool, True = masked: query a of block n (position n·c + a) may attend column t of its
    span (position n·c − left + t) only inside its band (a ≤ t ≤ a + span − c) and inside the sequence.
    Built once per shape and device (eagerly; traced when compiling), apart for inference mode."""
    compiling = torch.compiler.is_compiling()
    key = None if compiling else (length, c, span, left, device, torch.is_inference_mode_enabled())
    mask = None if key is None else _MASKS.get(key)
    if mask is None:
        rows = torch.arange(c, device=device)[:, None]  # (c, 1)
        cols = torch.arange(span, device=device)[None, :]  # (1, span)
        outside = torch.ones(span - c + padded, dtype=torch.bool, device=device)  # (left + N·c + right,)
        outside[left : left + length] = False
        mask = (cols < rows) | (cols > rows + span - c) | outside.unfold(0, span, c)[:, None, :]  # (N, c, span)
        if key is not None:
            if len(_MASKS) >= _MASKS_KEPT:
                _MASKS.clear()
            _MASKS[key] = mask
    return mask
