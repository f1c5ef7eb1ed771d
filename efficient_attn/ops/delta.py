"""The delta rule (DeltaNet) and its gated form (Gated DeltaNet), as a reference loop and in chunks.

S_t = a_t (I − β_t k_tᵀ k_t) S_{t−1} + β_t k_tᵀ v_t,   o_t = q_t S_t,
q, k (B, H, L, D) (rows), v (B, H, L, E), β (B, H, L), a_t = exp(log_gate_t) (B, H, L) or 1 (DeltaNet).
S (D, E) maps keys to values: each step writes v_t at k_t, replacing what S held there (β_t = 1).
No scale and no normalisation here (callers normalise k; the rule is stable for ‖k‖ = 1, β ∈ [0, 1]).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def delta_recurrence(
    q: Tensor, k: Tensor, v: Tensor, beta: Tensor, log_gate: Tensor | None = None, state: Tensor | None = None
) -> Tensor:
    """The reference: the plain per-token recurrence -> (B, H, L, E)."""
    return delta_recurrence_with_state(q, k, v, beta, log_gate, state)[0]


def delta_recurrence_with_state(
    q: Tensor, k: Tensor, v: Tensor, beta: Tensor, log_gate: Tensor | None = None, state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """:func:`delta_recurrence` and the final state S_L (B, H, D, E); ``state`` is S_0 (zeros if None)."""
    b, h, length, d = k.shape
    s = k.new_zeros(b, h, d, v.shape[-1]) if state is None else state  # (B, H, D, E)
    outs = []
    for t in range(length):
        kt, vt, bt = k[:, :, t, :, None], v[:, :, t, None, :], beta[:, :, t, None, None]  # (B, H, D, 1), (B, H, 1, E)
        if log_gate is not None:
            s = log_gate[:, :, t, None, None].exp() * s  # a_t S_{t−1}
        s = s + bt * kt * (vt - kt.transpose(-1, -2) @ s)  # (I − β k kᵀ) S + β k vᵀ, as one rank-1 update
        outs.append((q[:, :, t, None, :] @ s)[:, :, 0])  # (B, H, E)
    return torch.stack(outs, dim=2), s  # (B, H, L, E)


def chunked_delta(
    q: Tensor, k: Tensor, v: Tensor, beta: Tensor, log_gate: Tensor | None, chunk_size: int
) -> Tensor:
    """The chunked (WY / UT-transform) form of :func:`delta_recurrence`: O(L·C·(D+E) + L·D·E) time."""
    return chunked_delta_with_state(q, k, v, beta, log_gate, chunk_size)[0]


def chunked_delta_with_state(
    q: Tensor, k: Tensor, v: Tensor, beta: Tensor, log_gate: Tensor | None, chunk_size: int
) -> tuple[Tensor, Tensor]:
    """:func:`chunked_delta` and the final state S_L (B, H, D, E).

    In a chunk with start state S and cumulative log gate b (Γ_ij = e^{b_i − b_j}, j ≤ i), the updates
    u_t (S_t = a_t S_{t−1} + k_tᵀ u_t) solve (I + A) U = diag(β) V − diag(β e^b) K S with A the strictly
    lower part of diag(β) (K Kᵀ ⊙ Γ): one unit-triangular solve gives U = U' − W S (Yang et al. 2024's
    UT transform). Then O = (Q ⊙ e^b) S + tril(Q Kᵀ ⊙ Γ) U and S' = e^{b_C} S + (K ⊙ e^{b_C − b})ᵀ U.
    """
    b, h, length, d = q.shape
    e = v.shape[-1]
    c = max(1, min(chunk_size, length))
    n = -(-length // c)  # chunks
    pad = (0, 0, 0, n * c - length)  # zero rows: k = 0 and β = 0, gate 1: they change nothing
    qc, kc, vc = (F.pad(t, pad).view(b, h, n, c, -1) for t in (q, k, v))  # (B, H, N, C, ·)
    betac = F.pad(beta, pad[2:]).view(b, h, n, c, 1)  # (B, H, N, C, 1)
    if log_gate is None:
        cum = qc.new_zeros(b, h, n, c, 1)  # (B, H, N, C, 1)
    else:
        cum = F.pad(log_gate, pad[2:]).view(b, h, n, c, 1).cumsum(-2)  # (B, H, N, C, 1): b_i
    upper_or_diag = torch.ones(c, c, dtype=torch.bool, device=q.device).triu()  # j ≥ i
    gap = cum - cum.transpose(-1, -2)  # (B, H, N, C, C): b_i − b_j
    gamma = gap.masked_fill(upper_or_diag.triu(1), float("-inf")).exp()  # (B, H, N, C, C), 0 for j > i
    strict = (betac * (kc @ kc.transpose(-1, -2)) * gamma).masked_fill(upper_or_diag, 0.0)  # A (B, H, N, C, C)
    eye = torch.eye(c, dtype=q.dtype, device=q.device)
    rhs = torch.cat([betac * vc, betac * cum.exp() * kc], dim=-1)  # (B, H, N, C, E+D)
    solved = torch.linalg.solve_triangular(eye + strict, rhs, upper=False, unitriangular=True)
    u_in, w = solved.split([e, d], dim=-1)  # U' (B, H, N, C, E), W (B, H, N, C, D)
    scores = (qc @ kc.transpose(-1, -2)) * gamma  # (B, H, N, C, C): tril(Q Kᵀ ⊙ Γ), diagonal included
    q_in = qc * cum.exp()  # (B, H, N, C, D)
    last = cum[..., -1:, :]  # (B, H, N, 1, 1): b_C
    k_out = kc * (last - cum).exp()  # (B, H, N, C, D)
    s = qc.new_zeros(b, h, d, e)  # (B, H, D, E): S_0 = 0
    outs = []
    chunks = zip(*(t.unbind(dim=2) for t in (u_in, w, scores, q_in, k_out, last)))
    for u_i, w_i, scores_i, q_i, k_i, last_i in chunks:  # N × (B, H, C, ·)
        u = u_i - w_i @ s  # (B, H, C, E): the chunk's updates given its start state
        outs.append(q_i @ s + scores_i @ u)  # (B, H, C, E)
        s = last_i.exp() * s + k_i.transpose(-1, -2) @ u  # (B, H, D, E)
    out = torch.stack(outs, dim=2).reshape(b, h, n * c, e)  # (B, H, N·C, E)
    return out[:, :, :length], s
