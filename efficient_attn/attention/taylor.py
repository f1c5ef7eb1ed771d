"""Based (Arora et al. 2024, "Simple linear attention language models balance the recall-throughput
tradeoff"): linear attention with the 2nd-order Taylor feature map of exp."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..ops.causal_linear import chunk_spans
from ..ops.differentiable import double_backward_by_recompute
from ..ops.numerics import normalize, upcast, with_ones
from ..registry import register_attention
from .kernel import KernelAttention


@register_attention("taylor")
class TaylorAttention(KernelAttention):
    """Based's Taylor linear attention on a learned low-dimensional projection of q and k.

    q̃ = q W_h, k̃ = k W_h with W_h (D, d') per head (d' = ``feature_dim``), and
    φ(x) = [1, x/d'^{1/4}, (x ⊗ x)/(√2·√d')]  (M = 1 + d' + d'² features, the full outer product), so
    φ(q̃)·φ(k̃) = 1 + t + t²/2, t = q̃·k̃/√d': the 2nd-order Taylor expansion of exp(t), > 0 for every t
    (1 + t + t²/2 = ((1 + t)² + 1)/2 ≥ 1/2), so every normalizer of a row that sees a key is ≥ 1/2.
    out_i = φ(q̃_i)ᵀ Σ_j φ(k̃_j) v_jᵀ / φ(q̃_i)ᵀ Σ_j φ(k̃_j).
    O(L·M·Dv) time, O(L·M) memory; causal by chunked prefix sums (``chunk_size``), decoding with a
    constant (B, H, M, Dv+1) state. W_h starts as N(0, 1/D) entries (drawn by ``reset_parameters``,
    on the module's private stream inside a model) and is learned.
    Masks: key padding yes; causal yes.
    Training with ``recompute`` (the default) runs ``_TaylorChunked``: the M-wide features are made chunk by chunk
    (``chunk_size`` rows) from the d'-wide projections inside the products, forward and backward, so no (L, M)
    tensor ever exists (M = 273 at d' = 16, four times a 64-wide head); kept for backward: q, k, v, the output and
    the normalizer, as the other kernel attentions.
    """

    def __init__(
        self, head_dim: int, num_heads: int, *, feature_dim: int = 16, chunk_size: int = 64, recompute: bool = True
    ) -> None:
        super().__init__(head_dim, num_heads, chunk_size=chunk_size, recompute=recompute)
        if not isinstance(feature_dim, int) or isinstance(feature_dim, bool) or feature_dim < 1:
            raise ValueError(f"feature_dim must be a positive int, got {feature_dim!r}")
        self.feature_dim = feature_dim
        self.weight = nn.Parameter(torch.empty(num_heads, head_dim, feature_dim))  # (H, D, d')
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.normal_(0.0, self.head_dim**-0.5)  # q̃ entries have q's mean square

    def feature_map(self, x: Tensor, is_query: bool, *, fresh_grad: bool = False) -> tuple[Tensor, None]:
        xp = torch.einsum("bhnd,hde->bhne", x, self.weight.to(x.dtype))  # (B, H, N, d')
        return taylor_features(xp), None  # (B, H, N, 1 + d' + d'²), exact as returned

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, causal: bool
    ) -> Tensor:
        if not (self.remakes_features() and (q.requires_grad or k.requires_grad or self.weight.requires_grad)):
            return super().attend(q, k, v, key_padding_mask, causal)
        out_dtype = v.dtype
        with torch.autocast(q.device.type, enabled=False):
            q, k, v = upcast(q, k, v)
            out = _TaylorChunked.apply(self, key_padding_mask, causal, q, k, v, self.weight)  # (B, H, L, Dv)
        return out.to(out_dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, feature_dim={self.feature_dim}"


def taylor_features(xp: Tensor) -> Tensor:
    """(…, N, d') projections -> (…, N, 1 + d' + d'²) features [1, x̃/d'^{1/4}, x̃ ⊗ x̃/(√2·√d')]."""
    d = xp.shape[-1]
    # scaled on the d'-wide side: no second (…, N, d'²) tensor for the division and its gradient
    outer = (xp[..., :, None] * (xp / math.sqrt(2.0 * d))[..., None, :]).flatten(-2)  # (…, N, d'²)
    ones = torch.ones_like(xp[..., :1])  # (…, N, 1)
    return torch.cat([ones, xp / d**0.25, outer], dim=-1)  # outer: x̃_a x̃_b / (√2·√d')


def _features_grad(grad_phi: Tensor, xp: Tensor) -> Tensor:
    """The gradient for the projections xp (BH, C, d') of ``taylor_features`` from its features' (BH, C, M):
    d/dx̃ of x̃/d'^{1/4} and of Σ_ab G_ab x̃_a x̃_b/(√2·√d') = (G + Gᵀ) x̃/(√2·√d')."""
    d = xp.shape[-1]
    outer = grad_phi[..., 1 + d :].unflatten(-1, (d, d))  # (BH, C, d', d')
    both = (outer + outer.transpose(-1, -2)) @ xp[..., None]  # (BH, C, d', 1)
    return grad_phi[..., 1 : 1 + d] / d**0.25 + both.squeeze(-1) / math.sqrt(2.0 * d)


class _TaylorChunked(torch.autograd.Function):
    """Based's linear attention with the features made per chunk of ``chunk_size`` rows inside the products.

    Inputs: the module, key padding mask (B, S) or None, causal flag, upcast q, k (B, H, L, D), v (B, H, S, Dv) and
    the projection W (H, D, d'). Forward: x̃ = x W for all rows (d'-wide), then per chunk its features and, causal,
    the chunked prefix sums (state Σ φ(k_j)[v_j, 1]ᵀ, (M, Dv+1) per head; the chunk's masked (C, C) scores), else
    the one state then the queries. Keeps q, k, v, the output and the normalizer. Backward, causal: a forward
    sweep (dφ(q) from the states) and a reverse one (dφ(k), d[v, 1] from Σ_later φ(q_i) grad_iᵀ), each chunk's
    features made again and their gradients turned into dx̃ at once; then dq, dk, dW from dx̃. Working memory
    O(C·M + M·Dv) per head beside the (L, d')- and (L, Dv)-sized tensors. Second derivatives differentiate the
    generic path (``double_backward_by_recompute``)."""

    @staticmethod
    def forward(ctx, module, pad, causal, q, k, v, weight):
        b, h, length, _ = q.shape
        w = weight.to(q.dtype)
        xq = torch.einsum("bhnd,hde->bhne", q, w).flatten(0, 1)  # (BH, L, d')
        xk = torch.einsum("bhnd,hde->bhne", k, w).flatten(0, 1)  # (BH, S, d')
        v1 = with_ones(v, pad).flatten(0, 1)  # (BH, S, E), padded keys' rows zero
        chunks = chunk_spans(length, max(1, min(module.chunk_size, length)))
        out1 = _taylor_products(xq, xk, v1, causal, chunks, k.shape[2], module.chunk_size)  # (BH, L, E)
        num, den = out1[..., :-1], out1[..., -1:]  # (BH, L, Dv), (BH, L, 1)
        den = torch.where(den == 0, 1.0, den)
        out = out1.new_empty(b, length, h, num.shape[-1]).transpose(1, 2)  # (B, H, L, Dv) in (B, L, H, Dv) memory
        torch.div(num.view(b, h, length, -1), den.view(b, h, length, 1), out=out)
        ctx.module, ctx.pad, ctx.causal = module, pad, causal
        ctx.save_for_backward(q, k, v, weight, out, den)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, weight, out, den = ctx.saved_tensors
        module, pad, causal = ctx.module, ctx.pad, ctx.causal
        if torch.is_grad_enabled():  # create_graph=True: differentiate a plain re-computation
            grads = double_backward_by_recompute(
                lambda a, b_, c, *_: normalize(module._contract(a, b_, with_ones(c, pad), pad, causal)),
                (q, k, v, weight), (grad_out,),
            )
            return (None, None, None, *grads)
        b, h, length, _ = q.shape
        w = weight.to(q.dtype)
        xq = torch.einsum("bhnd,hde->bhne", q, w).flatten(0, 1)  # (BH, L, d')
        xk = torch.einsum("bhnd,hde->bhne", k, w).flatten(0, 1)  # (BH, S, d')
        v1 = with_ones(v, pad).flatten(0, 1)  # (BH, S, E)
        dot = (grad_out * out).sum(-1, keepdim=True).neg_()  # (B, H, L, 1): −Σ_e grad_e out_e
        grad1 = torch.cat([grad_out, dot], dim=-1).flatten(0, 1).div_(den)  # (BH, L, E)
        grad_xq, grad_xk, grad_v1 = torch.empty_like(xq), torch.empty_like(xk), torch.empty_like(v1)
        chunk = max(1, min(module.chunk_size, length))
        m, e = 1 + xq.shape[-1] + xq.shape[-1] ** 2, v1.shape[-1]
        if causal:
            state = xq.new_zeros(xq.shape[0], m, e)  # (BH, M, E): Σ_{earlier j} φ(k_j)[v_j, 1]ᵀ
            for s in chunk_spans(length, chunk):
                fq, fk, gc = taylor_features(xq[:, s]), taylor_features(xk[:, s]), grad1[:, s]  # (BH, C, ·)
                gv = torch.bmm(gc, v1[:, s].transpose(1, 2)).tril_()  # (BH, C, C)
                grad_fq = torch.bmm(gc, state.transpose(1, 2)).baddbmm_(gv, fk)  # (BH, C, M)
                grad_xq[:, s] = _features_grad(grad_fq, xq[:, s])
                state.baddbmm_(fk.transpose(1, 2), v1[:, s])
            rev = state.zero_()  # (BH, M, E): Σ_{later i} φ(q_i) grad_iᵀ
            for s in reversed(chunk_spans(length, chunk)):
                fq, fk, gc, vc = taylor_features(xq[:, s]), taylor_features(xk[:, s]), grad1[:, s], v1[:, s]
                scores = torch.bmm(fq, fk.transpose(1, 2)).tril_()  # (BH, C, C)
                gv = torch.bmm(gc, vc.transpose(1, 2)).tril_()  # (BH, C, C)
                grad_fk = torch.bmm(vc, rev.transpose(1, 2)).baddbmm_(gv.transpose(1, 2), fq)  # (BH, C, M)
                grad_v1[:, s] = torch.bmm(fk, rev).baddbmm_(scores.transpose(1, 2), gc)  # (BH, C, E)
                grad_xk[:, s] = _features_grad(grad_fk, xk[:, s])
                rev.baddbmm_(fq.transpose(1, 2), gc)
        else:
            kv = xq.new_zeros(xq.shape[0], m, e)  # (BH, M, E): Σ_j φ(k_j)[v_j, 1]ᵀ
            grad_kv = torch.zeros_like(kv)  # (BH, M, E): Σ_i φ(q_i) grad_iᵀ
            for s in chunk_spans(k.shape[2], chunk):
                kv.baddbmm_(taylor_features(xk[:, s]).transpose(1, 2), v1[:, s])
            for s in chunk_spans(length, chunk):
                fq = taylor_features(xq[:, s])  # (BH, C, M)
                grad_kv.baddbmm_(fq.transpose(1, 2), grad1[:, s])
                grad_xq[:, s] = _features_grad(torch.bmm(grad1[:, s], kv.transpose(1, 2)), xq[:, s])
            for s in chunk_spans(k.shape[2], chunk):
                fk = taylor_features(xk[:, s])  # (BH, C, M)
                grad_v1[:, s] = torch.bmm(fk, grad_kv)
                grad_xk[:, s] = _features_grad(torch.bmm(v1[:, s], grad_kv.transpose(1, 2)), xk[:, s])
        grad_xq, grad_xk = grad_xq.view(b, h, length, -1), grad_xk.view(b, h, k.shape[2], -1)  # (B, H, ·, d')
        grad_q = torch.einsum("bhne,hde->bhnd", grad_xq, w)  # (B, H, L, D)
        grad_k = torch.einsum("bhne,hde->bhnd", grad_xk, w)  # (B, H, S, D)
        grad_w = torch.einsum("bhnd,bhne->hde", q, grad_xq) + torch.einsum("bhnd,bhne->hde", k, grad_xk)
        grad_v = grad_v1.view(b, h, k.shape[2], -1)[..., :-1]  # (B, H, S, Dv): the ones column is a constant
        if pad is not None:
            grad_v = grad_v.masked_fill(pad[:, None, :, None], 0.0)
        return None, None, None, grad_q, grad_k, grad_v, grad_w.to(weight.dtype)


def _taylor_products(
    xq: Tensor, xk: Tensor, v1: Tensor, causal: bool, chunks: list[slice], s_len: int, chunk_size: int
) -> Tensor:
    """Unnormalised (numerators, normalizer) (BH, L, E) from projections xq (BH, L, d'), xk (BH, S, d') and
    v1 (BH, S, E), the features made per chunk."""
    m, e = 1 + xq.shape[-1] + xq.shape[-1] ** 2, v1.shape[-1]
    out1 = xq.new_empty(xq.shape[0], xq.shape[1], e)  # (BH, L, E)
    state = xq.new_zeros(xq.shape[0], m, e)  # (BH, M, E)
    if not causal:
        for s in chunk_spans(s_len, max(1, min(chunk_size, s_len))):
            state.baddbmm_(taylor_features(xk[:, s]).transpose(1, 2), v1[:, s])
        for s in chunks:
            out1[:, s] = torch.bmm(taylor_features(xq[:, s]), state)
        return out1
    for s in chunks:
        fq, fk = taylor_features(xq[:, s]), taylor_features(xk[:, s])  # (BH, C, M)
        scores = torch.bmm(fq, fk.transpose(1, 2)).tril_()  # (BH, C, C)
        out1[:, s] = torch.bmm(fq, state).baddbmm_(scores, v1[:, s])
        state.baddbmm_(fk.transpose(1, 2), v1[:, s])
    return out1
