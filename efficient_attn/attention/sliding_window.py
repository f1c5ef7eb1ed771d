"""Sliding-window (local) softmax attention, as in Longformer (Beltagy et al. 2020) and Mistral 7B (Jiang et al.
2023); the window ``window`` counts keys as stated in the class docstring, not as either paper does."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops.differentiable import recompute_active, recompute_in_backward
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
    Blocked: rows in blocks of c = min(w, 32) queries (w where autograd records: a faster backward), each
    against the span of keys its rows' bands cover (c + w − 1 causal, c + 2w − 2 bidirectional) under a
    banded mask: O(L·w·d) time, O(L·w) memory, and no (L, L) tensor ever exists. Row max
    subtracted (softmax); a row that sees no key outputs zeros.
    Masks: key padding yes; causal yes. Self-attention only: query i and key i are the same position,
    so cross-attention (S ≠ L) raises. Decoding keeps the last w keys/values (a cache bounded by w).
    Computed in float32 (float64 stays float64), also under autocast; the output comes in v's dtype.
    ``recompute`` (default True): in training, keep only q, k, v for backward (less than softmax's SDPA, which also
    keeps its output and log-sum-exp) and make the score blocks again there, instead of keeping the (L, w)-sized
    blocks (scores, weights, the key blocks' copies); same forward, same gradients (the same blocked computation,
    run once more in backward), at the cost of one more forward of the attention.
    """

    supports_cross_attention = False

    def __init__(
        self, head_dim: int, num_heads: int, *, window: int = 64, scale: float | None = None, recompute: bool = True
    ) -> None:
        super().__init__(head_dim, num_heads)
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise ValueError(f"window must be a positive int, got {window!r}")
        if scale is not None and not scale > 0:
            raise ValueError(f"scale must be positive, got {scale!r}")
        self.window, self.recompute = window, bool(recompute)
        self.scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, causal: bool
    ) -> Tensor:
        if recompute_active(self.recompute) and (q.requires_grad or k.requires_grad or v.requires_grad):
            window, scale = self.window, self.scale

            def blocked(a: Tensor, b: Tensor, c: Tensor) -> Tensor:  # (B, H, L, D) twice, (B, H, L, Dv)
                return _banded_for_autograd(a, b, c, key_padding_mask, causal, window, scale)

            with torch.autocast(q.device.type, enabled=False):
                out = recompute_in_backward(blocked, *upcast(q, k, v))  # (B, H, L, Dv)
            return out.to(v.dtype)
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
        return f"{super().extra_repr()}, window={self.window}, scale={self.scale:.4g}, recompute={self.recompute}"


def banded_softmax_attention(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, causal: bool, window: int, scale: float
) -> Tensor:
    """q, k (B, H, L, D), v (B, H, L, Dv) -> (B, H, L, Dv), softmax over each query's band of keys.

    w = min(window, L) (a window past the sequence's length sees all of it). Blocks of c = min(w, BLOCK)
    queries (where autograd records, :func:`_banded_for_autograd`: blocks of w against whole key blocks); block
    n's rows meet the span of keys their bands cover, positions n·c − (w − 1) to n·c + c − 1 (+ w − 1
    unless causal): a (c, span) score block, span = c + w − 1 causal, c + 2w − 2
    bidirectional, of which each row's band is w or 2w − 1 keys. The heads lie end to end as one
    sequence, so every span is a window of one strided view that the batched matmul reads in place (no
    copy of the keys per block); a span reaching into a neighbouring head, or past the sequence, is masked.
    """
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _banded_for_autograd(q, k, v, key_padding_mask, causal, window, scale)
    b, h, length, d = q.shape
    dv = v.shape[-1]
    w = min(window, length)
    c = min(w, BLOCK)  # queries per block
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
    weights = torch.softmax(scores, -1, out=scores)  # in place (no autograd here); row max subtracted inside
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
    Built once per shape and device (eagerly; traced when compiling); never saved by autograd (no-grad path)."""
    compiling = torch.compiler.is_compiling()
    key = None if compiling else (length, c, span, left, device)
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


def _banded_for_autograd(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, causal: bool, window: int, scale: float
) -> Tensor:
    """:func:`banded_softmax_attention` where autograd records: blocks of w queries against key blocks
    n−1, n (and n+1 unless causal), a (w, 2w or 3w) score block each; the matmuls copy the key blocks, and
    the backward runs faster on those copies than on the overlapping views of the forward alone."""
    b, h, length, d = q.shape
    w = min(window, length)
    n = -(-length // w)  # number of query blocks
    span = 2 * w if causal else 3 * w  # keys a block meets
    right = n * w - length + (0 if causal else w)  # zero keys after the sequence, so every block has a full span
    qb = F.pad(q, (0, 0, 0, n * w - length)).view(b, h, n, w, d)  # (B, H, N, w, D)
    kb = F.pad(k, (0, 0, w, right)).unfold(2, span, w)  # (B, H, N, D, span): keys from (n − 1)·w on
    vb = F.pad(v, (0, 0, w, right)).unfold(2, span, w)  # (B, H, N, Dv, span)
    allowed = _autograd_block_mask(key_padding_mask, b, length, w, span, right, causal, q.device)  # (B, 1, N, w, span)
    empty = ~allowed.any(-1, keepdim=True)  # (B, 1, N, w, 1): rows that see no key
    scores = (qb @ kb) * scale  # (B, H, N, w, span)
    # empty rows are let through to their whole span (finite: padding is zeroed) and zeroed afterwards
    weights = scores.masked_fill(~(allowed | empty), float("-inf")).softmax(-1)  # row max subtracted inside
    out = (weights @ vb.transpose(-1, -2)).masked_fill(empty, 0.0)  # (B, H, N, w, Dv)
    return out.reshape(b, h, n * w, -1)[:, :, :length]  # (B, H, L, Dv)


def _autograd_block_mask(
    key_padding_mask: Tensor | None, b: int, length: int, w: int, span: int, right: int, causal: bool,
    device: torch.device,
) -> Tensor:
    """(B, 1, N, w, span) bool: query a of block n (position n·w + a) may attend key c of its span
    (position n·w − w + c): inside the band, a real position, and not padding."""
    rows = torch.arange(w, device=device)[:, None]  # (w, 1)
    cols = torch.arange(span, device=device)[None, :]  # (1, span)
    offset = cols - w - rows  # (w, span): j − i
    band = (offset <= 0) & (offset > -w) if causal else offset.abs() < w  # (w, span)
    real = torch.zeros(b, w + length + right, dtype=torch.bool, device=device)  # (B, w + L + right)
    real[:, w : w + length] = True if key_padding_mask is None else ~key_padding_mask
    real = real.unfold(1, span, w)  # (B, N, span)
    return band & real[:, None, :, None, :]  # (B, 1, N, w, span)
