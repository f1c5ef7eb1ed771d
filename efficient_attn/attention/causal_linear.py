"""Causal linear attention by chunked prefix sums, with a hand-written backward.

out_i = Σ_{j≤i} (φ(q_i)·φ(k_j)) e^{g_j − G_i} v_j,   G_i = max_{j≤i} g_j,
for φ(q), φ(k) (L, M), v (L, E) and an optional per-key log-scale g (L,) (0 when absent).

The log-scale lets a key's features be stored divided by e^{g_j} (FAVOR+ keys span hundreds of
nats at large norms): each row is computed against its own running maximum G_i, as online softmax
does, and the factor e^{−G_i} cancels in the row's ratio of numerator and normalizer. G_i depends
only on keys 0..i, so no future key can move the past (not even by rounding), and every factor
e^{g_j − G_i}, e^{G_prev − G_i} is ≤ 1, so nothing overflows.

Chunks of C rows: inside a chunk a masked (C, C) product; across chunks one running (M, E) state,
kept relative to the running maximum and rescaled when it grows. The backward walks the chunks
again (forward order for dq, reverse order for dk and dv), so no (L, M, E) tensor and no per-chunk
state is stored; only the masked (C, C) blocks are kept between the passes.
Time O(L·M·E + L·C·(M+E)); extra memory O(B·H·(M·E + L·C)).
Second derivatives (``create_graph=True``) are exact through a plain autograd re-computation,
which holds the (L, L) weights: fine for gradient penalties, not meant for long sequences.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .differentiable import double_backward_by_recompute


def causal_linear_attention(
    phi_q: Tensor, phi_k: Tensor, v: Tensor, chunk_size: int, key_log_scale: Tensor | None = None
) -> Tensor:
    """(B, H, L, M), (B, H, L, M), (B, H, L, E), log-scale (B, H, L) or None -> (B, H, L, E)."""
    b, h, length, m = phi_q.shape
    e = v.shape[-1]
    flat = [t.reshape(b * h, length, -1) for t in (phi_q, phi_k, v)]  # (B·H, L, ·)
    g = None if key_log_scale is None else key_log_scale.detach().reshape(b * h, length)  # (B·H, L)
    out = _CausalLinear.apply(*flat, g, max(1, min(chunk_size, length)))  # (B·H, L, E)
    return out.reshape(b, h, length, e)


def _chunks(length: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, length)) for start in range(0, length, size)]


def _intra_weights(g: Tensor, run_max: Tensor, s: slice) -> Tensor:
    """(BH, C, C) factors e^{g_j − G_i} for j ≤ i inside chunk s, 0 above the diagonal."""
    logits = g[:, None, s] - run_max[:, s, None]  # (BH, C, C): [i, j] = g_j − G_i
    n = logits.shape[-1]
    future = torch.ones(n, n, dtype=torch.bool, device=g.device).triu_(1)  # j > i
    return logits.masked_fill_(future, float("-inf")).exp_()


class _CausalLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, chunk: int) -> Tensor:
        bh, length, m = q.shape
        out = torch.empty(bh, length, v.shape[-1], dtype=q.dtype, device=q.device)  # (BH, L, E)
        state = q.new_zeros(bh, m, v.shape[-1])  # (BH, M, E): Σ φ(k_j) v_jᵀ e^{g_j − ref} over earlier chunks
        run_max = None if g is None else g.cummax(-1).values  # (BH, L): G_i
        ref = None if g is None else run_max[:, :1]  # (BH, 1): the state's reference, G at its last key
        ctx.scores = []  # per chunk (BH, C, C), kept for backward: O(L·C) memory
        for s in _chunks(length, chunk):
            qc, kc, vc = q[:, s], k[:, s], v[:, s]  # (BH, C, M), (BH, C, M), (BH, C, E)
            scores = torch.bmm(qc, kc.transpose(1, 2))  # (BH, C, C)
            if g is None:
                scores.tril_()  # j ≤ i
                out[:, s] = torch.bmm(scores, vc).baddbmm_(qc, state)  # (BH, C, E)
                state.baddbmm_(kc.transpose(1, 2), vc)  # (BH, M, E)
            else:
                scores.mul_(_intra_weights(g, run_max, s))  # (BH, C, C): · e^{g_j − G_i}, j ≤ i
                carried = torch.bmm(qc, state).mul_((ref - run_max[:, s]).exp_()[..., None])  # (BH, C, E)
                out[:, s] = torch.bmm(scores, vc).add_(carried)
                end = run_max[:, s.stop - 1 : s.stop]  # (BH, 1): G at the chunk's last key
                decay = (g[:, s] - end).exp_()[..., None]  # (BH, C, 1)
                state.mul_((ref - end).exp_()[..., None]).baddbmm_(kc.transpose(1, 2), vc * decay)
                ref = end
            ctx.scores.append(scores)
        ctx.save_for_backward(q, k, v, g, run_max)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v, g, run_max = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiate a plain re-computation
            grads = double_backward_by_recompute(
                lambda a, b, c: _causal_plain(a, b, c, g), (q, k, v), (grad_out,)
            )
            return (*grads, None, None)
        grad_out = grad_out.contiguous()
        if g is None:
            return (*_backward_plain(ctx, q, k, v, grad_out), None, None)
        return (*_backward_scaled(ctx, q, k, v, g, run_max, grad_out), None, None)


def _backward_plain(ctx, q: Tensor, k: Tensor, v: Tensor, grad_out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
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
    return grad_q, grad_k, grad_v


def _backward_scaled(
    ctx, q: Tensor, k: Tensor, v: Tensor, g: Tensor, run_max: Tensor, grad_out: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """As ``_backward_plain`` with the factors w_ij = e^{g_j − G_i}; every exponent formed is ≤ 0."""
    chunks = _chunks(q.shape[1], ctx.chunk)
    grad_q, grad_k, grad_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    state = q.new_zeros(q.shape[0], q.shape[2], v.shape[2])  # (BH, M, E), as in forward
    ref = run_max[:, :1]  # (BH, 1)
    gvs = []
    for s in chunks:  # dq_i = Σ_{j≤i} (g_i·v_j) w_ij φ(k_j)
        kc, vc, gc = k[:, s], v[:, s], grad_out[:, s]
        gv = torch.bmm(gc, vc.transpose(1, 2)).mul_(_intra_weights(g, run_max, s))  # (BH, C, C)
        carried = torch.bmm(gc, state.transpose(1, 2)).mul_((ref - run_max[:, s]).exp_()[..., None])
        grad_q[:, s] = torch.bmm(gv, kc).add_(carried)  # (BH, C, M)
        end = run_max[:, s.stop - 1 : s.stop]  # (BH, 1)
        decay = (g[:, s] - end).exp_()[..., None]  # (BH, C, 1)
        state.mul_((ref - end).exp_()[..., None]).baddbmm_(kc.transpose(1, 2), vc * decay)
        ref = end
        gvs.append(gv)
    rev = state.zero_()  # (BH, M, E): Σ φ(q_i) g_iᵀ e^{ref − G_i} over later chunks
    ref = run_max[:, -1:]  # (BH, 1): G at the first later row (any value while rev is 0)
    for s, gv, scores in reversed(list(zip(chunks, gvs, ctx.scores))):
        # dk_j = Σ_{i≥j} (g_i·v_j) w_ij φ(q_i);  dv_j = Σ_{i≥j} (φ(q_i)·φ(k_j)) w_ij g_i
        qc, kc, vc, gc = q[:, s], k[:, s], v[:, s], grad_out[:, s]
        later = (g[:, s] - ref).exp_()[..., None]  # (BH, C, 1): e^{g_j − ref} ≤ 1
        grad_k[:, s] = torch.bmm(gv.transpose(1, 2), qc).add_(torch.bmm(vc, rev.transpose(1, 2)).mul_(later))
        grad_v[:, s] = torch.bmm(scores.transpose(1, 2), gc).add_(torch.bmm(kc, rev).mul_(later))
        start = run_max[:, s.start : s.start + 1]  # (BH, 1): G at this chunk's first row
        weight = (start - run_max[:, s]).exp_()[..., None]  # (BH, C, 1): e^{start − G_i} ≤ 1
        rev.mul_((start - ref).exp_()[..., None]).baddbmm_(qc.transpose(1, 2), gc * weight)
        ref = start
    return grad_q, grad_k, grad_v


def _causal_plain(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None) -> Tensor:
    """The same function in plain autograd ops, with the (BH, L, L) weights materialised."""
    length = q.shape[1]
    scores = q @ k.transpose(1, 2)  # (BH, L, L)
    if g is None:
        return scores.tril() @ v
    weights = _intra_weights(g, g.cummax(-1).values, slice(0, length))  # (BH, L, L)
    return (scores * weights) @ v
