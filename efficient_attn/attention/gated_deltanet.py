"""``gated_deltanet``: the delta rule with Mamba-2's decay (Yang, Kautz & Hatamizadeh, ICLR 2025, arXiv:2412.06464)."""

from __future__ import annotations

from ..registry import register_attention
from .gated import GatedRecurrentAttention


@register_attention("gated_deltanet")
class GatedDeltaNetAttention(GatedRecurrentAttention):
    """S_t = α_t (I − β_t k_tᵀ k_t) S_{t−1} + β_t k_tᵀ v_t,  o_t = (q_t/√D) S_t,  β_t = σ(x_t w_h),
    α_t = exp(−exp(A_log_h) · softplus(x_t u_h + dt_bias_h)) (Mamba-2's decay, one per head and token).

    q and k are L2-normalised; the gate lets the state forget quickly, the delta rule lets it
    overwrite one association. Trained in chunks (the UT transform with the gate's cumulative log
    products inside each chunk, all ≤ 1).
    Cost: O(L·C·(D + Dv) + L·D·Dv) time in chunks of C = ``chunk_size``, O(D·Dv) per decoded token;
    state (B, H, D, Dv).
    Masks: causal self-attention only; padded positions leave the state unchanged (α = 1, β = 0).
    """

    delta_rule = True
    mamba2_gate = True
