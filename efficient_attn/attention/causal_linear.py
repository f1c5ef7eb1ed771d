"""Causal linear attention by chunked prefix sums, with a hand-written backward.

out_i = Σ_{j≤i} (φ(q_i)·φ(k_j)) v_j  for φ(q), φ(k) (L, M) and v (L, E).

Chunks of C rows: inside a chunk a masked (C, C) product; across chunks one running (M, E) state.
The backward walks the chunks again (forward order for dq, reverse order for dk and dv), so
nothing larger than the inputs is ever stored: no (L, M, E) tensor, no per-chunk states; only
the masked (C, C) blocks are kept between the passes.
Time O(L·M·E + L·C·(M+E)); extra memory O(B·H·(M·E + L·C)).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable


def causal_linear_attention(phi_q: Tensor, phi_k: Tensor, v: Tensor, chunk_size: int) -> Tensor:
    """(B, H, L, M), (B, H, L, M), (B, H, L, E) -> (B, H, L, E)."""
    b, h, length, m = phi_q.shape
    e = v.shape[-1]
    flat = [t.reshape(b * h, length, -1) for t in (phi_q, phi_k, v)]  # (B·H, L, ·)
    out = _CausalLinear.apply(*flat, max(1, min(chunk_size, length)))  # (B·H, L, E)
    return out.reshape(b, h, length, e)


def _chunks(length: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, length)) for start in range(0, length, size)]


class _CausalLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, chunk: int) -> Tensor:
        bh, length, m = q.shape
        out = torch.empty(bh, length, v.shape[-1], dtype=q.dtype, device=q.device)  # (BH, L, E)
        state = q.new_zeros(bh, m, v.shape[-1])  # (BH, M, E): Σ φ(k_j) v_jᵀ over earlier chunks
        ctx.scores = []  # per chunk (BH, C, C), kept for backward: O(L·C) memory
        for s in _chunks(length, chunk):
            qc, kc, vc = q[:, s], k[:, s], v[:, s]  # (BH, C, M), (BH, C, M), (BH, C, E)
            scores = torch.bmm(qc, kc.transpose(1, 2)).tril_()  # (BH, C, C): j ≤ i
            out[:, s] = torch.bmm(scores, vc).baddbmm_(qc, state)  # (BH, C, E)
            state.baddbmm_(kc.transpose(1, 2), vc)  # (BH, M, E)
            ctx.scores.append(scores)
        ctx.save_for_backward(q, k, v)
        ctx.chunk = chunk
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        q, k, v = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        chunks = _chunks(q.shape[1], ctx.chunk)
        grad_q, grad_k, grad_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        state = q.new_zeros(q.shape[0], q.shape[2], v.shape[2])  # (BH, M, E), as in forward
        gvs = []
        for s in chunks:  # dq_i = Σ_{j≤i} (g_i·v_j) φ(k_j)
            kc, vc, gc = k[:, s], v[:, s], grad_out[:, s]
            gv = torch.bmm(gc, vc.transpose(1, 2)).tril_()  # (BH, C, C)
            grad_q[:, s] = torch.bmm(gv, kc).baddbmm_(gc, state.transpose(1, 2))  # (BH, C, M)
            state.baddbmm_(kc.transpose(1, 2), vc)
            gvs.append(gv)
        rev = state.zero_()  # (BH, M, E): Σ φ(q_i) g_iᵀ over later chunks
        for s, gv, scores in reversed(list(zip(chunks, gvs, ctx.scores))):
            # dk_j = Σ_{i≥j} (g_i·v_j) φ(q_i);  dv_j = Σ_{i≥j} (φ(q_i)·φ(k_j)) g_i
            qc, kc, vc, gc = q[:, s], k[:, s], v[:, s], grad_out[:, s]
            grad_k[:, s] = torch.bmm(gv.transpose(1, 2), qc).baddbmm_(vc, rev.transpose(1, 2))  # (BH, C, M)
            grad_v[:, s] = torch.bmm(scores.transpose(1, 2), gc).baddbmm_(kc, rev)  # (BH, C, E)
            rev.baddbmm_(qc.transpose(1, 2), gc)
        return grad_q, grad_k, grad_v, None
