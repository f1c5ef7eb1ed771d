"""Bahdanau et al. 2015 additive attention, chunked over queries."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..registry import register_attention
from .base import Attention, masked_softmax

_CHUNK_ELEMENTS = 1 << 22  # tanh elements alive at once when chunk_size is automatic (16 MiB fp32)


@register_attention("additive")
class AdditiveAttention(Attention):
    """Additive (Bahdanau, "concat") attention with per-head parameters.

    score(q, k) = w_hᵀ tanh(W_q q + W_k k + b),  out = softmax(scores) V.
    O(L·S·hidden) time; O(L·S + chunk·S·hidden) memory: the (L, S, hidden) tanh tensor is never
    formed, queries go through in chunks, recomputed in backward (activation checkpointing).
    Masks: key padding yes; causal yes.
    """

    def __init__(
        self,
        head_dim: int,
        num_heads: int,
        *,
        hidden_dim: int | None = None,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__(head_dim, num_heads)
        self.hidden_dim = head_dim if hidden_dim is None else hidden_dim
        if self.hidden_dim < 1:
            raise ValueError(f"hidden_dim must be positive, got {hidden_dim!r}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be positive or None (automatic), got {chunk_size!r}")
        self.chunk_size = chunk_size
        h, d, n = num_heads, head_dim, self.hidden_dim
        self.w_q = nn.Parameter(torch.empty(h, d, n))  # (H, D, hidden)
        self.w_k = nn.Parameter(torch.empty(h, d, n))  # (H, D, hidden)
        self.bias = nn.Parameter(torch.empty(h, n))  # (H, hidden)
        self.w_out = nn.Parameter(torch.empty(h, n))  # (H, hidden)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for p, fan_in in ((self.w_q, self.head_dim), (self.w_k, self.head_dim),
                          (self.bias, self.head_dim), (self.w_out, self.hidden_dim)):
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(p, -bound, bound)

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, causal: bool
    ) -> Tensor:
        dtype = q.dtype
        qp = torch.einsum("bhld,hdn->bhln", q, self.w_q.to(dtype)) + self.bias.to(dtype)[:, None]  # (B, H, L, n)
        kp = torch.einsum("bhsd,hdn->bhsn", k, self.w_k.to(dtype))  # (B, H, S, n)
        w_out = self.w_out.to(dtype)
        recompute = torch.is_grad_enabled() and any(t.requires_grad for t in (qp, kp, w_out))
        chunks = []
        for qp_chunk in qp.split(self._chunk_rows(kp), dim=2):
            if recompute:
                chunks.append(checkpoint(_additive_scores, qp_chunk, kp, w_out, use_reentrant=False))
            else:
                chunks.append(_additive_scores(qp_chunk, kp, w_out))
        scores = torch.cat(chunks, dim=2)  # (B, H, L, S)
        weights = masked_softmax(scores, key_padding_mask, causal)  # (B, H, L, S)
        return weights @ v  # (B, H, L, Dv)

    def _chunk_rows(self, kp: Tensor) -> int:
        if self.chunk_size is not None:
            return self.chunk_size
        b, h, s, n = kp.shape
        return max(1, _CHUNK_ELEMENTS // (b * h * s * n))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, hidden_dim={self.hidden_dim}, chunk_size={self.chunk_size}"


def _additive_scores(qp: Tensor, kp: Tensor, w_out: Tensor) -> Tensor:
    """w_hᵀ tanh(qp_i + kp_j) for one chunk of queries: (B, H, c, n), (B, H, S, n) -> (B, H, c, S)."""
    hidden = torch.tanh(qp[:, :, :, None, :] + kp[:, :, None, :, :])  # (B, H, c, S, n)
    return torch.einsum("bhcsn,hn->bhcs", hidden, w_out)  # (B, H, c, S)
