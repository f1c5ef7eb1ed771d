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
state is stored; forward keeps only its inputs (and G); backward makes each masked (C, C) score block
(with its e^{g_j − G_i} factors) again where it needs it, one product per chunk, and holds only the
gradient blocks (g_i·v_j, C × C) between its two passes.
Time O(L·M·E + L·C·(M+E)); extra memory O(B·H·(M·E + L·C)), the L·C part in backward only.
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


def chunk_spans(length: int, size: int) -> list[slice]:
    """Consecutive slices of ``size`` rows covering 0..length−1 (the last one may be shorter)."""
    return [slice(start, min(start + size, length)) for start in range(0, length, size)]


def intra_weights(g: Tensor, run_max: Tensor, s: slice) -> Tensor:
    """(BH, C, C) factors e^{g_j − G_i} for j ≤ i inside chunk s; above the diagonal ≤ 1 garbage that the
    caller's ``tril_`` on the scores zeroes (clamped at 0 before exp, so it never overflows)."""
    logits = g[:, None, s] - run_max[:, s, None]  # (BH, C, C): [i, j] = g_j − G_i, ≤ 0 for j ≤ i
    return logits.clamp_max_(0.0).exp_()


class Scales:
    """Every per-row and per-chunk factor of the scaled recurrences, computed once, all ≤ 1.

    g (BH, L) key log-scales, G = running max. Forward (state referenced to G at the previous
    chunk's last key, ``ref``): ``carry`` e^{ref − G_i} per row, ``decay`` e^{g_j − G_end} per key,
    ``shrink`` e^{ref − G_end} per chunk. Backward's reverse state is referenced to G at the first
    row of the following chunk (``start``): ``later`` e^{g_j − start_next} per key, ``weight``
    e^{start − G_i} per row, ``grow`` e^{start − start_next} per chunk.
    """

    def __init__(self, g: Tensor, run_max: Tensor, chunks: list[slice]) -> None:
        length = g.shape[1]
        chunk_of = torch.arange(length, device=g.device) // chunks[0].stop  # (L,)
        ends = torch.tensor([c.stop - 1 for c in chunks], device=g.device)  # (N,)
        refs = torch.cat([ends.new_zeros(1), ends[:-1]])  # (N,): the previous chunk's last key (0 at first)
        starts = torch.tensor([c.start for c in chunks], device=g.device)  # (N,)
        nexts = torch.cat([starts[1:], starts.new_full((1,), length - 1)])  # (N,): next chunk's first row
        g_end, g_ref = run_max[:, ends], run_max[:, refs]  # (BH, N)
        self.carry = (g_ref[:, chunk_of] - run_max).exp_()[..., None]  # (BH, L, 1)
        self.decay = (g - g_end[:, chunk_of]).exp_()[..., None]  # (BH, L, 1)
        self.shrink = (g_ref - g_end).exp_()[..., None, None]  # (BH, N, 1, 1)
        self._backward_args = (g, run_max, chunk_of, starts, nexts)

    def reverse(self) -> "Scales":
        """Add the reverse pass's factors (backward only, so forward does not pay for them)."""
        g, run_max, chunk_of, starts, nexts = self._backward_args
        g_start, g_next = run_max[:, starts], run_max[:, nexts]  # (BH, N)
        self.later = (g - g_next[:, chunk_of]).exp_()[..., None]  # (BH, L, 1)
        self.weight = (g_start[:, chunk_of] - run_max).exp_()[..., None]  # (BH, L, 1)
        self.grow = (g_start - g_next).exp_()[..., None, None]  # (BH, N, 1, 1)
        return self


class _CausalLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, chunk: int) -> Tensor:
        bh, length, m = q.shape
        chunks = chunk_spans(length, chunk)
        out = torch.empty(bh, length, v.shape[-1], dtype=q.dtype, device=q.device)  # (BH, L, E)
        state = q.new_zeros(bh, m, v.shape[-1])  # (BH, M, E): Σ φ(k_j) v_jᵀ (· e^{g_j − ref}) so far
        run_max = None if g is None else g.cummax(-1).values  # (BH, L): G_i
        scales = None if g is None else Scales(g, run_max, chunks)
        v_in = v if g is None else v * scales.decay  # (BH, L, E): what enters the state
        for n, s in enumerate(chunks):
            qc, kc = q[:, s], k[:, s]  # (BH, C, M)
            scores = torch.bmm(qc, kc.transpose(1, 2)).tril_()  # (BH, C, C): j ≤ i
            carried = torch.bmm(qc, state)  # (BH, C, E)
            if g is not None:
                scores.mul_(intra_weights(g, run_max, s))  # · e^{g_j − G_i}
                carried.mul_(scales.carry[:, s])  # · e^{ref − G_i}
                state.mul_(scales.shrink[:, n])  # re-reference to G at this chunk's last key
            out[:, s] = carried.baddbmm_(scores, v[:, s])  # (BH, C, E)
            state.baddbmm_(kc.transpose(1, 2), v_in[:, s])  # (BH, M, E)
        ctx.save_for_backward(q, k, v, g, run_max)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v, g, run_max = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiate a plain re-computation
            grads = double_backward_by_recompute(
                lambda a, b, c: causal_plain(a, b, c, g), (q, k, v), (grad_out,)
            )
            return (*grads, None, None)
        return (*causal_linear_backward(q, k, v, g, run_max, ctx.chunk, grad_out.contiguous()), None, None)


def causal_linear_backward(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, run_max: Tensor | None, chunk: int, grad_out: Tensor,
    *, overwrite_k: bool = False, overwrite_v: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """dq_i = Σ_{j≤i} (g_i·v_j) w_ij φ(k_j);  dk_j = Σ_{i≥j} (g_i·v_j) w_ij φ(q_i);
    dv_j = Σ_{i≥j} (φ(q_i)·φ(k_j)) w_ij g_i,  w_ij = e^{g_j − G_i} (1 without log-scales).
    Flat (BH, L, ·) features q, k, values v, log-scales g (BH, L) or None and their running maximum G,
    the chunk C, the output's gradient (BH, L, E). The forward pass's masked score blocks (with w) are made
    again in the reverse pass, where they are used; every other factor comes from ``Scales`` (all ≤ 1).
    ``overwrite_k``: k is a buffer no one else holds; dk is written into it, each chunk after that chunk's last use
    of k (the reverse pass goes last), so backward needs one (L, M) buffer fewer; ``overwrite_v`` likewise for v
    and dv (each chunk of v is last read in its reverse step, before dv is written there)."""
    chunks = chunk_spans(q.shape[1], chunk)
    scales = None if g is None else Scales(g, run_max, chunks).reverse()
    v_in = v if g is None else v * scales.decay  # (BH, L, E), as in forward
    g_in = grad_out if g is None else grad_out * scales.weight  # (BH, L, E): what enters rev
    grad_q, grad_v = torch.empty_like(q), v if overwrite_v else torch.empty_like(v)
    grad_k = k if overwrite_k else torch.empty_like(k)
    state = q.new_zeros(q.shape[0], q.shape[2], v.shape[2])  # (BH, M, E), as in forward
    gvs = []
    for n, s in enumerate(chunks):
        kc, gc = k[:, s], grad_out[:, s]
        gv = torch.bmm(gc, v[:, s].transpose(1, 2)).tril_()  # (BH, C, C)
        carried = torch.bmm(gc, state.transpose(1, 2))  # (BH, C, M)
        if g is not None:
            gv.mul_(intra_weights(g, run_max, s))
            carried.mul_(scales.carry[:, s])
            state.mul_(scales.shrink[:, n])
        grad_q[:, s] = carried.baddbmm_(gv, kc)  # (BH, C, M)
        state.baddbmm_(kc.transpose(1, 2), v_in[:, s])
        gvs.append(gv)
    rev = state.zero_()  # (BH, M, E): Σ φ(q_i) g_iᵀ (· e^{start − G_i}) over later chunks
    for n in reversed(range(len(chunks))):
        s, gv = chunks[n], gvs[n]
        qc, kc, vc, gc = q[:, s], k[:, s], v[:, s], grad_out[:, s]
        scores = torch.bmm(qc, kc.transpose(1, 2)).tril_()  # (BH, C, C): forward's block, made again
        if g is not None:
            scores.mul_(intra_weights(g, run_max, s))
        from_later_k = torch.bmm(vc, rev.transpose(1, 2))  # (BH, C, M)
        from_later_v = torch.bmm(kc, rev)  # (BH, C, E)
        if g is not None:
            from_later_k.mul_(scales.later[:, s])
            from_later_v.mul_(scales.later[:, s])
            rev.mul_(scales.grow[:, n])  # re-reference to G at this chunk's first row
        grad_k[:, s] = from_later_k.baddbmm_(gv.transpose(1, 2), qc)  # (BH, C, M); kc is not used after this
        grad_v[:, s] = from_later_v.baddbmm_(scores.transpose(1, 2), gc)  # (BH, C, E)
        rev.baddbmm_(qc.transpose(1, 2), g_in[:, s])
    return grad_q, grad_k, grad_v


def causal_plain(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None) -> Tensor:
    """The same function in plain autograd ops, with the (BH, L, L) weights materialised."""
    length = q.shape[1]
    scores = q @ k.transpose(1, 2)  # (BH, L, L)
    if g is None:
        return scores.tril() @ v
    weights = intra_weights(g, g.cummax(-1).values, slice(0, length))  # (BH, L, L)
    return (scores.tril() * weights) @ v
