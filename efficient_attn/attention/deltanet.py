"""``deltanet``: the delta rule (Schlag et al. 2021; Yang et al., NeurIPS 2024, arXiv:2406.06484)."""

from __future__ import annotations

from ..registry import register_attention
from .gated import GatedRecurrentAttention


@register_attention("deltanet")
class DeltaNetAttention(GatedRecurrentAttention):
    """S_t = (I − β_t k_tᵀ k_t) S_{t−1} + β_t k_tᵀ v_t,  o_t = (q_t/√D) S_t,  β_t = σ(x_t w_h) per head.

    Each step writes v_t at key k_t, replacing a β_t share of what the state held there; q and k are
    L2-normalised (the rule is a contraction for ‖k‖ = 1, β ∈ (0, 1)). Trained in chunks by the
    WY / UT-transform form of Yang et al. 2024 (one C×C unit-triangular solve per chunk).
    Cost: O(L·C·(D + Dv) + L·D·Dv) time in chunks of C = ``chunk_size``, O(D·Dv) per decoded token;
    state (B, H, D, Dv).
    Masks: causal self-attention only; padded positions leave the state unchanged (β = 0).
    """

    delta_rule = True
