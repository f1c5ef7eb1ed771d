"""Bahdanau et al. 2015 additive attention, chunked over queries."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..ops.differentiable import double_backward_by_recompute
from ..registry import register_attention
from .base import Attention, masked_softmax

_CHUNK_ELEMENTS = 1 << 21  # tanh elements alive at once when chunk_size is automatic (8 MiB fp32)


@register_attention("additive")
class AdditiveAttention(Attention):
    """Additive (Bahdanau, "concat") attention with per-head parameters.

    score(q, k) = w_hᵀ tanh(W_q q + W_k k + b),  out = softmax(scores) V.
    O(L·S·hidden) time; O(L·S + chunk·S·hidden) memory: the (L, S, hidden) tanh tensor is never
    formed; query rows go through in chunks, and backward recomputes each chunk's tanh.
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
        scores = _AdditiveScores.apply(qp, kp, self.w_out.to(dtype), self._chunk_rows(kp))  # (B, H, L, S)
        weights = masked_softmax(scores, key_padding_mask, causal)  # (B, H, L, S)
        return weights @ v  # (B, H, L, Dv)

    def _chunk_rows(self, kp: Tensor) -> int:
        if self.chunk_size is not None:
            return self.chunk_size
        b, h, s, n = kp.shape
        return max(1, _CHUNK_ELEMENTS // (b * h * s * n))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, hidden_dim={self.hidden_dim}, chunk_size={self.chunk_size}"


class _AdditiveScores(torch.autograd.Function):
    """scores[i, j] = w_hᵀ tanh(qp_i + kp_j), a chunk of query rows at a time, forward and backward.

    One (B, H, rows, S, n) buffer is reused by every chunk and nothing of that size is saved:
    backward recomputes tanh per chunk. qp (B, H, L, n), kp (B, H, S, n), w_out (H, n) -> (B, H, L, S).
    Second derivatives (``create_graph=True``) are exact, through a plain autograd re-computation.
    """

    @staticmethod
    def forward(ctx, qp: Tensor, kp: Tensor, w_out: Tensor, rows: int) -> Tensor:
        b, h, length, n = qp.shape
        scores = qp.new_empty(b, h, length, kp.shape[2])  # (B, H, L, S)
        buf = qp.new_empty(b, h, min(rows, length), kp.shape[2], n)  # (B, H, rows, S, n)
        for s in range(0, length, rows):
            hidden = _tanh_sum(buf, qp[:, :, s : s + rows], kp)  # (B, H, c, S, n)
            scores[:, :, s : s + rows] = (hidden @ w_out[:, None, :, None]).squeeze(-1)  # (B, H, c, S)
        ctx.save_for_backward(qp, kp, w_out)
        ctx.rows = rows
        return scores

    @staticmethod
    def backward(ctx, grad: Tensor):
        qp, kp, w_out = ctx.saved_tensors
        rows, length = ctx.rows, qp.shape[2]
        if torch.is_grad_enabled():  # create_graph=True: differentiate a plain re-computation
            return (*double_backward_by_recompute(_scores_plain, (qp, kp, w_out), (grad,)), None)
        grad_qp, grad_kp, grad_w = torch.empty_like(qp), torch.zeros_like(kp), torch.zeros_like(w_out)
        buf = qp.new_empty(qp.shape[0], qp.shape[1], min(rows, length), kp.shape[2], qp.shape[3])
        for s in range(0, length, rows):
            hidden = _tanh_sum(buf, qp[:, :, s : s + rows], kp)  # (B, H, c, S, n)
            g = grad[:, :, s : s + rows].unsqueeze(-1)  # (B, H, c, S, 1)
            grad_w += torch.einsum("bhcsx,bhcsn->hn", g, hidden)  # (H, n)
            pre = hidden.mul_(hidden).neg_().add_(1.0).mul_(g).mul_(w_out[:, None, None, :])  # g·w·(1 − tanh²)
            grad_qp[:, :, s : s + rows] = pre.sum(3)  # (B, H, c, n)
            grad_kp += pre.sum(2)  # (B, H, S, n)
        return grad_qp, grad_kp, grad_w, None


def _scores_plain(qp: Tensor, kp: Tensor, w_out: Tensor) -> Tensor:
    """The same scores in plain autograd ops, with the (B, H, L, S, n) tanh tensor materialised."""
    hidden = torch.tanh(qp[:, :, :, None, :] + kp[:, :, None, :, :])  # (B, H, L, S, n)
    return torch.einsum("bhlsn,hn->bhls", hidden, w_out)  # (B, H, L, S)


def _tanh_sum(buf: Tensor, qp: Tensor, kp: Tensor) -> Tensor:
    """tanh(qp_i + kp_j) written into buf: (B, H, c, n), (B, H, S, n) -> (B, H, c, S, n) view of buf."""
    out = buf[:, :, : qp.shape[2]]
    torch.add(qp[:, :, :, None, :], kp[:, :, None, :, :], out=out)
    return out.tanh_()
