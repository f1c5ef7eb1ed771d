"""``mamba2``: linear attention with Mamba-2's scalar data-dependent decay (Dao & Gu, ICML 2024, arXiv:2405.21060)."""

from __future__ import annotations

from ..registry import register_attention
from .gated import GatedRecurrentAttention


@register_attention("mamba2")
class Mamba2Attention(GatedRecurrentAttention):
    """S_t = a_t S_{t−1} + k_tᵀ v_t,  o_t = (q_t/√D) S_t,  a_t = exp(−exp(A_log_h) · softplus(x_t w_h + dt_bias_h)).

    Mamba-2's state-space duality (SSD) form with one decay per head and token: its C, B, x are q, k, v
    here; Mamba-2's short convolution is the ``MultiHeadAttention`` option ``short_conv``, and its
    input scaling by dt is not applied (this is flash-linear-attention's ``simple_gla`` with Mamba-2's
    parametrisation and initialisation of the decay: A ~ U[1, 16], dt ~ logU[1e-3, 0.1]).
    Cost: O(L·C·(D + Dv) + L·D·Dv) time in chunks of C = ``chunk_size``, O(D·Dv) per decoded token;
    state (B, H, D, Dv).
    Masks: causal self-attention only; padded positions leave the state unchanged (a = 1).
    """

    mamba2_gate = True
