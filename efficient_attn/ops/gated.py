"""Linear attention with a data-dependent decay of its state (GLA's per-channel gate, Mamba-2's scalar one).

S_t = Diag(a_t) S_{t−1} + k_tᵀ v_t,   o_t = q_t S_t,   a_t = exp(log_gate_t) (per channel, or one per head),
q, k (B, H, L, D), v (B, H, L, E), S (D, E). No scale is applied here (callers scale q).

Every product of gates is formed in log space from cumulative sums inside one chunk, b_i − b_j with j ≤ i
(≤ 0 for gates in (0, 1]), split at a row r between them into e^{b_i − b_r} · e^{b_r − b_j}, both ≤ 1, so no
factor overflows and none underflows to a silent zero unless the true value is below the float's range.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def gated_recurrence(q: Tensor, k: Tensor, v: Tensor, log_gate: Tensor, state: Tensor | None = None) -> Tensor:
    """The reference: the plain per-token recurrence. log_gate (B, H, L, D) or (B, H, L, 1) -> (B, H, L, E)."""
    return gated_recurrence_with_state(q, k, v, log_gate, state)[0]


def gated_recurrence_with_state(
    q: Tensor, k: Tensor, v: Tensor, log_gate: Tensor, state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """:func:`gated_recurrence` and the final state S_L (B, H, D, E); ``state`` is S_0 (zeros if None)."""
    b, h, length, d = k.shape
    s = k.new_zeros(b, h, d, v.shape[-1]) if state is None else state  # (B, H, D, E)
    outs = []
    for t in range(length):
        gate = log_gate[:, :, t, :, None].exp()  # (B, H, D|1, 1)
        s = gate * s + k[:, :, t, :, None] * v[:, :, t, None, :]  # (B, H, D, E)
        outs.append((q[:, :, t, None, :] @ s)[:, :, 0])  # (B, H, E)
    return torch.stack(outs, dim=2), s  # (B, H, L, E)


def chunked_gated(q: Tensor, k: Tensor, v: Tensor, log_gate: Tensor, chunk_size: int) -> Tensor:
    """The chunked form of :func:`gated_recurrence`: O(L·C·D + L·D·E) time, no (L, D, E) tensor."""
    return chunked_gated_with_state(q, k, v, log_gate, chunk_size)[0]


def chunked_gated_with_state(
    q: Tensor, k: Tensor, v: Tensor, log_gate: Tensor, chunk_size: int
) -> tuple[Tensor, Tensor]:
    """:func:`chunked_gated` and the final state S_L (B, H, D, E).

    Chunk n, row i: Σ_{j≤i in chunk} (Σ_d q_id k_jd e^{b_id − b_jd}) v_j + (q_i ⊙ e^{b_i}) S_n, with b the
    cumulative log gate inside the chunk; S_{n+1} = e^{b_C} ⊙ S_n + Σ_j (k_j ⊙ e^{b_C − b_j})ᵀ v_j.
    A per-channel gate never forms (C, C, D) factors (:func:`_channel_scores`); a scalar gate forms (C, C).
    """
    b, h, length, d = q.shape
    c = max(1, min(chunk_size, length))
    n = -(-length // c)  # chunks
    pad = (0, 0, 0, n * c - length)  # zero rows: gate 1 (log 0), k = v = 0, so they change nothing
    qc, kc, vc, gc = (F.pad(t, pad).view(b, h, n, c, -1) for t in (q, k, v, log_gate))  # (B, H, N, C, ·)
    cum = gc.cumsum(-2)  # (B, H, N, C, D|1): b_i = Σ_{s≤i} log a_s within the chunk
    if gc.shape[-1] == 1:
        scores = (qc @ kc.transpose(-1, -2)) * _pairwise_decay(cum)[..., 0]  # (B, H, N, C, C)
    else:
        scores = _channel_scores(qc, kc, cum)  # (B, H, N, C, C)
    out = scores @ vc  # (B, H, N, C, E)
    last = cum[..., -1:, :]  # (B, H, N, 1, D|1): b_C
    k_out = kc * (last - cum).exp()  # (B, H, N, C, D): k_j ⊙ e^{b_C − b_j}
    kv = k_out.transpose(-1, -2) @ vc  # (B, H, N, D, E): each chunk's contribution to the next state
    chunk_decay = last.transpose(-1, -2).exp()  # (B, H, N, D|1, 1): e^{b_C}
    states = [kv.new_zeros(b, h, d, vc.shape[-1])]  # S_0 = 0
    # unbind, not kv[:, :, i]: each index's backward fills a zero tensor the size of kv, O(N²) in all
    for kv_i, decay_i in zip(kv.unbind(dim=2), chunk_decay.unbind(dim=2)):  # N × (B, H, D, E)
        states.append(decay_i * states[-1] + kv_i)  # (B, H, D, E)
    out = out + (qc * cum.exp()) @ torch.stack(states[:-1], dim=2)  # (B, H, N, C, E)
    return out.reshape(b, h, n * c, -1)[:, :, :length], states[-1]  # (B, H, L, E), (B, H, D, E)


def _pairwise_decay(cum: Tensor) -> Tensor:
    """(…, C, G) cumulative log gates -> (…, C, C, G) e^{b_i − b_j} for j ≤ i, 0 above (never overflows)."""
    c = cum.shape[-2]
    diff = cum[..., :, None, :] - cum[..., None, :, :]  # (…, C, C, G): b_i − b_j
    upper = torch.ones(c, c, dtype=torch.bool, device=cum.device).triu(1)  # j > i
    return diff.masked_fill(upper[:, :, None], float("-inf")).exp()


def _channel_scores(q: Tensor, k: Tensor, cum: Tensor) -> Tensor:
    """(…, C, D) q, k, cumulative per-channel log gates -> (…, C, C) Σ_d q_id k_jd e^{b_id − b_jd}, j ≤ i.

    By halving: for blocks of 2w rows (w = 1, 2, 4, …), the scores of the late half's rows i on the early
    half's keys j are one matrix product split at r, the early half's last row: (q_i ⊙ e^{b_i − b_r}) ·
    (k_j ⊙ e^{b_r − b_j}), both factors ≤ 1; with the diagonal (factor 1) these blocks tile j ≤ i. C is padded
    to a power of two with rows that change nothing. O(C·D·log C) elementwise and O(C²·D) in products per
    chunk; no (C, C, D) tensor.
    """
    c, d = q.shape[-2:]
    size = 1 << (c - 1).bit_length()  # the power of two ≥ C
    if size > c:  # padded rows: q = k = 0, gate 1 (b stays at its last value)
        q, k = (F.pad(t, (0, 0, 0, size - c)) for t in (q, k))  # (…, size, D)
        cum = torch.cat([cum, cum[..., -1:, :].expand(*cum.shape[:-2], size - c, d)], dim=-2)  # (…, size, D)
    parts, w = [(q * k).sum(-1)], 1  # the diagonal (…, size)
    while w < size:
        qb, kb, cb = (t.unflatten(-2, (size // (2 * w), 2, w)) for t in (q, k, cum))  # (…, n, 2, w, D)
        ref = cb[..., 0, -1:, :]  # (…, n, 1, D): b_r, the early half's last row
        q_late = qb[..., 1, :, :] * (cb[..., 1, :, :] - ref).exp()  # (…, n, w, D): e^{b_i − b_r} ≤ 1
        k_early = kb[..., 0, :, :] * (ref - cb[..., 0, :, :]).exp()  # (…, n, w, D): e^{b_r − b_j} ≤ 1
        parts.append((q_late @ k_early.transpose(-1, -2)).flatten(-3))  # (…, n·w·w)
        w *= 2
    flat = torch.cat(parts, dim=-1)  # (…, size·(size+1)/2): every j ≤ i once
    scores = flat.new_zeros(*flat.shape[:-1], size * size).index_copy(-1, _halving_index(size, q.device), flat)
    return scores.unflatten(-1, (size, size))[..., :c, :c]  # (…, C, C)


def _halving_index(size: int, device: torch.device) -> Tensor:
    """Flat positions i·size + j of the entries :func:`_channel_scores` concatenates: the diagonal, then for
    each w the late-half rows × early-half keys of every block of 2w rows."""
    rows = torch.arange(size, device=device)
    index, w = [rows * (size + 1)], 1
    while w < size:
        start = torch.arange(0, size, 2 * w, device=device)[:, None, None]  # (n, 1, 1): each block's first row
        offset = torch.arange(w, device=device)
        i, j = start + w + offset[:, None], start + offset[None, :]  # (n, w, 1), (n, 1, w)
        index.append((i * size + j).flatten())  # (n·w·w,)
        w *= 2
    return torch.cat(index)
