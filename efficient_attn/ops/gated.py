"""Linear attention with a data-dependent decay of its state (GLA's per-channel gate, Mamba-2's scalar one).

S_t = Diag(a_t) S_{t−1} + k_tᵀ v_t,   o_t = q_t S_t,   a_t = exp(log_gate_t) (per channel, or one per head),
q, k (B, H, L, D), v (B, H, L, E), S (D, E). No scale is applied here (callers scale q).

Every product of gates is formed in log space as a difference of cumulative sums inside one chunk,
b_i − b_j with j ≤ i (≤ 0 for gates in (0, 1]), so no factor overflows and none underflows to a silent
zero unless the true value is below the float's range.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

SUB_BLOCK = 16  # per-channel gates: pairwise (c, c, D) factors only inside sub-blocks of this many rows


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
    A per-channel gate forms the (C, C, D) factors (O(L·C·D) memory); a scalar gate only (C, C).
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
        scores = _channel_scores(qc, kc, cum, SUB_BLOCK)  # (B, H, N, C, C)
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


def _channel_scores(q: Tensor, k: Tensor, cum: Tensor, sub: int) -> Tensor:
    """(…, C, D) q, k, cumulative per-channel log gates -> (…, C, C) Σ_d q_id k_jd e^{b_id − b_jd}, j ≤ i.

    Inside each sub-block of s rows the (s, s, D) factors are formed pairwise; across sub-blocks J < I
    the factor splits at r, the last row of J: e^{b_i − b_r} · e^{b_r − b_j}, both ≤ 1, so those
    blocks are matrix products. O(C·s·D) elementwise and O(C²·D) in products per chunk.
    """
    c = q.shape[-2]
    s = sub if c % sub == 0 and c > sub else c
    m = c // s  # sub-blocks
    qs, ks, cs = (t.unflatten(-2, (m, s)) for t in (q, k, cum))  # (…, m, s, D)
    diag = (qs[..., :, None, :] * ks[..., None, :, :] * _pairwise_decay(cs)).sum(-1)  # (…, m, s, s)
    if m == 1:
        return diag[..., 0, :, :]  # (…, C, C)
    ref = cs[..., -1, :]  # (…, m, D): b_r at the last row of each sub-block J
    q_from = q[..., None, :, :] * (cum[..., None, :, :] - ref[..., :, None, :]).clamp_max(0.0).exp()  # (…, m, C, D)
    k_to = ks * (ref[..., None, :] - cs).exp()  # (…, m, s, D): e^{b_r − b_j} ≤ 1
    cross = (q_from @ k_to.transpose(-1, -2)).transpose(-3, -2).flatten(-2)  # (…, m, C, s) -> (…, C, m·s)
    block = torch.arange(c, device=q.device) // s  # (C,): each row's sub-block
    later = block[:, None] > block[None, :]  # (C, C): j in an earlier sub-block than i
    same = block[:, None] == block[None, :]  # (C, C)
    diag_full = diag[..., :, :, None, :].expand(*diag.shape[:-1], m, s).flatten(-4, -3).flatten(-2)  # (…, C, C)
    return torch.where(same, diag_full, torch.where(later, cross, 0.0))  # (…, C, C)
