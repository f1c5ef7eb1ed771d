"""FAVOR+ with the positive feature map fused into the linear-attention products.

out_i = Σ_j (φ(q_i)·φ(k_j)) e^{g_j − G_i} v_j / Σ_j (φ(q_i)·φ(k_j)) e^{g_j − G_i}   (visible j),
φ(x) = exp(x w_sᵀ − r_x) with r_x its largest entry (``features.positive_features``, w_s = scale·w),
g_j = r_{k_j} − ‖scale·k_j‖²/2 a key's log-scale, G_i the largest visible one (``kernel``'s convention:
the maximum over the unpadded keys, or causally the running maximum, as ``causal_linear`` does).

The generic path (``KernelAttention.attend`` + ``features.positive_features``) builds φ(q), φ(k)
and, in backward, their gradients as whole (L, m) tensors (m ≫ d) and sweeps each through memory
several times (amax, exp, the gradient's product with φ, the normalisation). Here the features of a
block of rows are made while in cache (x·w_sᵀ, row max, exp), used by the products at once and kept
for backward, where each block's (or causal chunk's) gradient becomes dx while in cache too: the kept
features are the only (L, m)-sized data, no gradient of them is ever whole, and the output
normalisation is part of the same Function. Same estimator and stabilisation, never more FLOPs.

Non-causal: every key block first (their log-scales give G), then one (m, Dv+1) state
Σ_j φ(k_j) e^{g_j − G} [v_j, 1]ᵀ, then the queries; for short sequences the other product order,
(φ(q)φ(k)ᵀ)·v, when it costs fewer FLOPs (``_pairwise_is_cheaper``). Causal: the chunked prefix sums of
``causal_linear._CausalLinear`` (same scale factors, ``Scales``, all ≤ 1) on the kept features;
forward also keeps each chunk's incoming state (O(L/C · m·Dv)) so that backward is a single reverse
pass. Padded keys carry a log-scale far below any real one and zero value-and-normalizer rows (the
caller's ``v1``), so they never reach an output or a gradient. Second derivatives go through plain
autograd (``double_backward_by_recompute`` on ``_favor_plain``), as everywhere in the core.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .causal_linear import Scales, causal_plain, chunk_spans, intra_weights
from .differentiable import double_backward_by_recompute
from .features import positive_features_plain
from .numerics import PADDED_LOG_SCALE, normalize, scale_values, with_ones

BLOCK_ELEMENTS = 1 << 20  # features made at once, all heads (rows × m): 4 MiB fp32, cache-sized
MIN_BLOCK_ROWS = 64  # many heads (training batches) still get matrix products of some size


def favor_positive_attention(
    q: Tensor, k: Tensor, v: Tensor, w: Tensor, scale: float,
    key_padding_mask: Tensor | None, causal: bool, chunk_size: int, recompute: bool = False,
) -> Tensor:
    """Normalised FAVOR+ attention with positive features of ``scale``·x against the rows of w.

    q (B, H, L, d), k (B, H, S, d), v (B, H, S, Dv): values, zero on padded keys (the normalizer's column of
    ones, [v, 1], is appended here, zero on padded keys too); w (m, d); key_padding_mask (B, S) or None;
    ``chunk_size``: causal chunk C.
    Returns (B, H, L, Dv); a row that sees no key gets 0. Float32 or float64 throughout.
    ``recompute`` (causal): keep no features, score blocks or chunk states for backward, which makes them
    again chunk by chunk (one more pass of the feature map over q and two over k, one more state sweep; the keys'
    log-scales made again too), so that it keeps what softmax's fused kernel keeps: q, k, v, the output and one
    (L,)-sized statistic per row (the normalizer).
    """
    b, h, length, _ = q.shape
    s_len = k.shape[2]
    pad = None
    if key_padding_mask is not None:
        pad = key_padding_mask[:, None, :].expand(b, h, s_len).reshape(b * h, s_len)  # (BH, S)
    rows = max(MIN_BLOCK_ROWS, BLOCK_ELEMENTS // (b * h * w.shape[0]))
    if causal:  # [v, 1] made inside, so that backward keeps v, not [v, 1]
        flat = [t.reshape(b * h, t.shape[2], t.shape[3]) for t in (q, k, v)]  # (BH, ·, ·)
        chunk = max(1, min(chunk_size, length))
        out = _CausalFavor.apply(*flat, w, scale, pad, chunk, max(1, rows // chunk) * chunk, recompute, b)
        return out.reshape(b, h, length, -1)  # (B, H, L, Dv) in (B, L, H, Dv) memory already
    flat = [t.reshape(b * h, t.shape[2], t.shape[3]) for t in (q, k, with_ones(v, key_padding_mask))]  # (BH, ·, ·)
    if _pairwise_is_cheaper(length, s_len, w.shape[0], v.shape[-1] + 1) and max(length, s_len) <= rows:
        out = _PairwiseFavor.apply(*flat, w, scale, pad)
    else:
        out = _NoncausalFavor.apply(*flat, w, scale, pad, rows)
    return out.reshape(b, h, length, -1)  # (B, H, L, Dv)


def _features(x: Tensor, w_s: Tensor, s: slice) -> tuple[Tensor, Tensor]:
    """Rows s of x: features exp(x w_sᵀ − r) (BH, C, m) in (0, 1] and r (BH, C), made in place."""
    logits = torch.matmul(x[:, s], w_s.t())  # (BH, C, m)
    row_max = logits.amax(-1, keepdim=True)  # (BH, C, 1)
    return logits.sub_(row_max).exp_(), row_max.squeeze(-1)


def _key_features(
    x: Tensor, w_s: Tensor, scale: float, pad: Tensor | None, rows: int
) -> tuple[list[Tensor], Tensor]:
    """Key features in blocks of ``rows`` and log-scales g = r − scale²‖x‖²/2 (BH, S), padded keys
    at ``PADDED_LOG_SCALE`` (below any real key, so they never set a maximum)."""
    blocks, g = [], x.new_empty(x.shape[:2])  # (BH, S)
    for s in chunk_spans(x.shape[1], rows):
        phi, g[:, s] = _features(x, w_s, s)
        blocks.append(phi)
    return blocks, _log_scales(g, x, scale, pad)


def _key_log_scales(x: Tensor, w_s: Tensor, scale: float, pad: Tensor | None, rows: int) -> Tensor:
    """The log-scales of ``_key_features`` (BH, S) alone, bit for bit (the same products, block by block), no
    features kept: one (rows, m) block of logits at a time."""
    g = x.new_empty(x.shape[:2])  # (BH, S)
    for s in chunk_spans(x.shape[1], rows):
        g[:, s] = torch.matmul(x[:, s], w_s.t()).amax(-1)  # (BH, C): each key's largest logit r
    return _log_scales(g, x, scale, pad)


def _log_scales(r: Tensor, x: Tensor, scale: float, pad: Tensor | None) -> Tensor:
    """g = r − scale²‖x‖²/2 (BH, S), written into r; padded keys at ``PADDED_LOG_SCALE``."""
    r.sub_(x.square().sum(-1).mul_(scale * scale / 2.0))
    return r if pad is None else r.masked_fill_(pad, PADDED_LOG_SCALE)


def _query_features(x: Tensor, w_s: Tensor, rows: int) -> list[Tensor]:
    """Query features in blocks of ``rows`` (their row maxima cancel in each row's ratio)."""
    return [_features(x, w_s, s)[0] for s in chunk_spans(x.shape[1], rows)]


def _x_grad(grad_phi: Tensor, phi: Tensor, w_aug: Tensor, x: Tensor | None) -> Tensor:
    """dx from the features' gradient (overwritten), r a constant: grad_phi·φ @ w_s for queries;
    keys also carry −scale²‖x‖²/2, so ``w_aug`` = [w_s, −scale²] and its last column returns the
    coefficient of x (Σ grad·φ) in the same product, without another pass over (C, m)."""
    grad = torch.matmul(grad_phi.mul_(phi), w_aug)  # (BH, C, d) or (BH, C, d+1)
    return grad if x is None else grad[..., :-1].addcmul_(x, grad[..., -1:])


def _augmented(w_s: Tensor, scale: float) -> Tensor:
    """[w_s, −scale²] (m, d+1): see ``_x_grad``."""
    return torch.cat([w_s, w_s.new_full((w_s.shape[0], 1), -scale * scale)], dim=-1)


def _divisor(out1: Tensor) -> Tensor:
    """(…, E) numerators and normalizer -> the normalizer (…, 1), 1 where it is 0: a row that sees
    no key has zero numerators too, and gets 0 (``kernel.normalize``)."""
    den = out1[..., -1:]
    return torch.where(den == 0, 1.0, den)


def _normalized_grad(grad_out: Tensor, out: Tensor, den: Tensor) -> Tensor:
    """The gradient of (numerators, normalizer) (BH, L, Dv+1) from that of out = numerators / den."""
    dot = (grad_out * out).sum(-1, keepdim=True).neg_()  # (BH, L, 1): −Σ_e grad_e out_e
    return torch.cat([grad_out, dot], dim=-1).div_(den)


class _NoncausalFavor(torch.autograd.Function):
    """Forward 2·(L+S)·m·d (features) + 2·(L+S)·m·(Dv+1) FLOPs, backward 2·(L+S)·m·d + 4·(L+S)·m·(Dv+1)."""

    @staticmethod
    def forward(ctx, xq, xk, v1, w, scale, pad, rows):
        w_s = w * scale  # (m, d)
        keys, g = _key_features(xk, w_s, scale, pad, rows)
        weights = (g - g.amax(-1, keepdim=True)).exp_()[..., None]  # (BH, S, 1): e^{g_j − G}, ≤ 1
        v_in = v1 * weights  # (BH, S, E)
        kv = xq.new_zeros(xq.shape[0], w.shape[0], v1.shape[-1])  # (BH, m, E)
        for s, phi in zip(chunk_spans(xk.shape[1], rows), keys):
            kv.baddbmm_(phi.transpose(1, 2), v_in[:, s])
        queries = _query_features(xq, w_s, rows)
        out1 = torch.cat([torch.bmm(phi, kv) for phi in queries], dim=1)  # (BH, L, E)
        den = _divisor(out1)
        out = out1[..., :-1].div_(den)
        ctx.save_for_backward(xq, xk, v1, w, pad, kv, weights, out, den, *keys, *queries)
        ctx.scale, ctx.rows, ctx.key_blocks = scale, rows, len(keys)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        xq, xk, v1, w, pad, kv, weights, out, den, *kept = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiate a plain re-computation
            grads = double_backward_by_recompute(
                lambda a, b, c: _favor_plain(a, b, c, w, ctx.scale, pad, False), (xq, xk, v1), (grad_out,)
            )
            return (*grads, None, None, None, None)
        keys, queries = kept[: ctx.key_blocks], kept[ctx.key_blocks :]
        w_s = w * ctx.scale
        grad1 = _normalized_grad(grad_out, out, den)  # (BH, L, E)
        grad_kv, grad_xq = torch.zeros_like(kv), torch.empty_like(xq)  # (BH, m, E), (BH, L, d)
        for s, phi in zip(chunk_spans(xq.shape[1], ctx.rows), queries):
            grad_kv.baddbmm_(phi.transpose(1, 2), grad1[:, s])
            grad_xq[:, s] = _x_grad(torch.bmm(grad1[:, s], kv.transpose(1, 2)), phi, w_s, None)
        w_aug, v_in = _augmented(w_s, ctx.scale), v1 * weights
        grad_xk, grad_v_in = torch.empty_like(xk), torch.empty_like(v1)
        for s, phi in zip(chunk_spans(xk.shape[1], ctx.rows), keys):
            grad_v_in[:, s] = torch.bmm(phi, grad_kv)
            grad_phi = torch.bmm(v_in[:, s], grad_kv.transpose(1, 2))  # (BH, C, m)
            grad_xk[:, s] = _x_grad(grad_phi, phi, w_aug, xk[:, s])
        return grad_xq, grad_xk, grad_v_in.mul_(weights), None, None, None, None


def _pairwise_is_cheaper(length: int, s_len: int, m: int, e: int) -> bool:
    """Whether (φ(q)φ(k)ᵀ)·v, 2·L·S·(m+E) FLOPs, costs less than φ(q)·(φ(k)ᵀv), 2·(L+S)·m·E: short
    sequences (L = S < 2mE/(m+E), about 2E for m ≫ E), e.g. the quickstart's ~12 tokens. The
    (L, S) scores are then smaller than the features, so memory does not grow either."""
    return length * s_len * (m + e) < (length + s_len) * m * e


class _PairwiseFavor(torch.autograd.Function):
    """Non-causal, the same estimator in the other product order (``_pairwise_is_cheaper``): forward
    2·(L+S)·m·d (features) + 2·L·S·(m+E) FLOPs, backward 2·(L+S)·m·d + 4·L·S·(m+E); one block."""

    @staticmethod
    def forward(ctx, xq, xk, v1, w, scale, pad):
        w_s = w * scale  # (m, d)
        (phi_k,), g = _key_features(xk, w_s, scale, pad, xk.shape[1])  # (BH, S, m), (BH, S)
        phi_q = _features(xq, w_s, slice(None))[0]  # (BH, L, m)
        weights = (g - g.amax(-1, keepdim=True)).exp_()[..., None]  # (BH, S, 1): e^{g_j − G}, ≤ 1
        scores = torch.bmm(phi_q, phi_k.transpose(1, 2))  # (BH, L, S)
        out1 = torch.bmm(scores, v1 * weights)  # (BH, L, E)
        den = _divisor(out1)
        out = out1[..., :-1].div_(den)
        ctx.save_for_backward(xq, xk, v1, w, pad, weights, out, den, phi_q, phi_k, scores)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        xq, xk, v1, w, pad, weights, out, den, phi_q, phi_k, scores = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiate a plain re-computation
            grads = double_backward_by_recompute(
                lambda a, b, c: _favor_plain(a, b, c, w, ctx.scale, pad, False), (xq, xk, v1), (grad_out,)
            )
            return (*grads, None, None, None)
        w_s = w * ctx.scale
        grad1 = _normalized_grad(grad_out, out, den)  # (BH, L, E)
        grad_scores = torch.bmm(grad1, (v1 * weights).transpose(1, 2))  # (BH, L, S)
        grad_xq = _x_grad(torch.bmm(grad_scores, phi_k), phi_q, w_s, None)
        grad_xk = _x_grad(torch.bmm(grad_scores.transpose(1, 2), phi_q), phi_k, _augmented(w_s, ctx.scale), xk)
        return grad_xq, grad_xk, torch.bmm(scores.transpose(1, 2), grad1).mul_(weights), None, None, None


class _CausalFavor(torch.autograd.Function):
    """``causal_linear._CausalLinear`` on features made in blocks (``rows``, a multiple of the chunk C)
    and kept; forward also keeps each chunk's incoming state, so backward is one reverse pass that
    turns each chunk's feature gradients into dq, dk at once. The first chunk has no incoming state
    and the last no later rows: their products with a zero state are skipped (a single chunk, as at
    the quickstart's lengths, is then just the masked (C, C) scores).
    With ``recompute`` nothing (L, m)- or per-chunk-sized is kept, nor the keys' log-scales: backward makes the
    log-scales again (``_key_log_scales``), sweeps the chunks forward to make the incoming states again (key
    features made per chunk), then in its reverse pass makes each chunk's features and masked scores again; the
    states are held only during this backward. Takes v (BH, S, Dv) and keeps it, [v, 1] made in forward and
    again in backward."""

    @staticmethod
    def forward(ctx, xq, xk, v, w, scale, pad, chunk, rows, recompute, batch):
        v1 = _with_ones(v, pad)  # (BH, S, Dv+1)
        bh, length, _ = xq.shape
        w_s = w * scale
        keys, g = _key_features(xk, w_s, scale, pad, rows)
        queries = _query_features(xq, w_s, rows)
        run_max = g.cummax(-1).values  # (BH, L): G_i
        chunks = chunk_spans(length, chunk)
        scales = Scales(g, run_max, chunks)
        v_in = v1 * scales.decay  # (BH, L, E): what enters the state
        state = xq.new_zeros(bh, w.shape[0], v1.shape[-1])  # (BH, m, E)
        out1 = xq.new_empty(bh, length, v1.shape[-1])  # (BH, L, E)
        kept = []  # per chunk: incoming state, weighted (C, C) scores
        for n, s in enumerate(chunks):  # the first chunk has no state yet, the last leaves none
            qc, kc = _in_block(queries, s, rows), _in_block(keys, s, rows)  # (BH, C, m)
            scores = torch.bmm(qc, kc.transpose(1, 2)).tril_().mul_(intra_weights(g, run_max, s))
            if n == 0:
                out1[:, s] = torch.bmm(scores, v1[:, s])
            else:
                carried = torch.bmm(qc, state).mul_(scales.carry[:, s])  # (BH, C, E)
                out1[:, s] = carried.baddbmm_(scores, v1[:, s])
            if not recompute:
                kept += [state, scores]  # each state is a new tensor (below), so the kept ones stay as they were
            if n + 1 < len(chunks):
                state = state.mul(scales.shrink[:, n]).baddbmm_(kc.transpose(1, 2), v_in[:, s])
        den = _divisor(out1)
        # (B, H, L, Dv) in (B, L, H, Dv) memory: the heads' merge after it is a view, not a copy
        out = out1.new_empty(batch, length, bh // batch, out1.shape[-1] - 1).transpose(1, 2)
        out.copy_(out1[..., :-1].view(out.shape) / den.view(*out.shape[:-1], 1))  # compile refuses a strided out=
        if recompute:
            keys, queries, g = [], [], None
        ctx.save_for_backward(xq, xk, v, w, pad, g, out, den, *keys, *queries, *kept)
        ctx.scale, ctx.chunk, ctx.rows, ctx.blocks, ctx.recompute = scale, chunk, rows, len(keys), recompute
        return out

    @staticmethod
    def backward(ctx, grad_out):
        xq, xk, v, w, pad, g, out, den, *kept = ctx.saved_tensors
        out, grad_out = out.reshape(-1, *out.shape[-2:]), grad_out.reshape(-1, *grad_out.shape[-2:])  # (BH, L, Dv)
        if torch.is_grad_enabled():  # create_graph=True: differentiate a plain re-computation
            grads = double_backward_by_recompute(
                lambda a, b, c: _favor_plain(a, b, _with_ones(c, pad), w, ctx.scale, pad, True), (xq, xk, v),
                (grad_out,),
            )
            return (*grads, None, None, None, None, None, None, None)
        keys, queries, kept = kept[: ctx.blocks], kept[ctx.blocks : 2 * ctx.blocks], kept[2 * ctx.blocks :]
        w_s = w * ctx.scale
        v1 = _with_ones(v, pad)  # (BH, S, Dv+1), as in forward
        if g is None:  # recompute: the keys' log-scales again, the same values
            g = _key_log_scales(xk, w_s, ctx.scale, pad, ctx.rows)
        w_aug = _augmented(w_s, ctx.scale)
        run_max = g.cummax(-1).values  # (BH, L): G_i
        chunks = chunk_spans(xq.shape[1], ctx.chunk)
        scales = Scales(g, run_max, chunks).reverse()
        if ctx.recompute:  # the forward's incoming states again: chunk features made and dropped
            state, v_in = xq.new_zeros(xq.shape[0], w.shape[0], v1.shape[-1]), v1 * scales.decay  # (BH, m, E)
            for n, s in enumerate(chunks):
                kept += [state, None]
                if n + 1 < len(chunks):
                    kc = _features(xk, w_s, s)[0]  # (BH, C, m)
                    state = state.mul(scales.shrink[:, n]).baddbmm_(kc.transpose(1, 2), v_in[:, s])
            del v_in
        grad1 = _normalized_grad(grad_out, out, den)  # (BH, L, E)
        g_in = grad1 * scales.weight  # (BH, L, E): what enters the reverse state
        grad_xq, grad_xk, grad_v1 = torch.empty_like(xq), torch.empty_like(xk), torch.empty_like(v1)
        rev = None  # (BH, m, E): Σ φ(q_i) grad_iᵀ (· e^{start − G_i}) over later chunks
        for n in reversed(range(len(chunks))):
            s, (state, scores) = chunks[n], kept[2 * n : 2 * n + 2]
            kept[2 * n] = None  # a re-made state goes once used
            if ctx.recompute:
                qc, kc = _features(xq, w_s, s)[0], _features(xk, w_s, s)[0]  # (BH, C, m)
                weights = intra_weights(g, run_max, s)  # (BH, C, C)
                scores = torch.bmm(qc, kc.transpose(1, 2)).tril_().mul_(weights)
            else:
                qc, kc = _in_block(queries, s, ctx.rows), _in_block(keys, s, ctx.rows)  # (BH, C, m)
                weights = intra_weights(g, run_max, s)
            gc, vc, later = grad1[:, s], v1[:, s], scales.later[:, s]
            gv = torch.bmm(gc, vc.transpose(1, 2)).tril_().mul_(weights)  # (BH, C, C)
            grad_q = torch.bmm(gv, kc)  # (BH, C, m); the first chunk had no incoming state
            if n:
                grad_q.baddbmm_(gc * scales.carry[:, s], state.transpose(1, 2))
            grad_k = torch.bmm(gv.transpose(1, 2), qc)  # (BH, C, m); the last chunk has no later rows
            grad_v1[:, s] = torch.bmm(scores.transpose(1, 2), gc)
            if rev is not None:
                grad_k.baddbmm_(vc * later, rev.transpose(1, 2))
                grad_v1[:, s] += torch.bmm(kc, rev).mul_(later)
            if n:
                entering = torch.bmm(qc.transpose(1, 2), g_in[:, s])  # (BH, m, E)
                rev = entering if rev is None else entering.add_(rev.mul_(scales.grow[:, n]))
            grad_xq[:, s] = _x_grad(grad_q, qc, w_s, None)
            grad_xk[:, s] = _x_grad(grad_k, kc, w_aug, xk[:, s])
        grad_v = grad_v1[..., :-1]  # (BH, S, Dv): the ones column is a constant
        if pad is not None:
            grad_v = grad_v.masked_fill(pad[..., None], 0.0)
        return grad_xq, grad_xk, grad_v, None, None, None, None, None, None, None


def _with_ones(v: Tensor, pad: Tensor | None) -> Tensor:
    """Flat v (BH, S, Dv) -> [v, 1] (BH, S, Dv+1), padded keys' rows (pad (BH, S)) zero."""
    v1 = F.pad(v, (0, 1), value=1.0)  # (BH, S, Dv+1)
    return v1 if pad is None else v1.masked_fill(pad[..., None], 0.0)


def _in_block(blocks: list[Tensor], s: slice, rows: int) -> Tensor:
    """Rows s (inside one block of ``rows``) of features kept in blocks: a view (BH, C, m)."""
    start = s.start % rows
    return blocks[s.start // rows][:, start : start + s.stop - s.start]


def _favor_plain(
    xq: Tensor, xk: Tensor, v1: Tensor, w: Tensor, scale: float, pad: Tensor | None, causal: bool
) -> Tensor:
    """The same function in plain autograd ops (the (L, m) features and, causal, (L, L) weights
    materialised): the second-derivative path and the tests' reference."""
    phi_q = positive_features_plain(xq * scale, w, True)  # (BH, L, m)
    phi_k = positive_features_plain(xk * scale, w, False)  # (BH, S, m)
    with torch.no_grad():
        xs = xk * scale
        g = (xs @ w.T).amax(-1) - xs.square().sum(-1) / 2.0  # (BH, S)
        if pad is not None:
            g = g.masked_fill(pad, PADDED_LOG_SCALE)
    if causal:
        out1 = causal_plain(phi_q, phi_k, v1, g)
    else:
        out1 = phi_q @ (phi_k.transpose(1, 2) @ scale_values(v1, g))
    return normalize(out1)
