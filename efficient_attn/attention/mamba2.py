"""``mamba2``: linear attention with Mamba-2's scalar data-dependent decay (Dao & Gu, ICML 2024, arXiv:2405.21060)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..registry import register_attention
from .gated import GatedRecurrentAttention, init_mamba2_decay, mamba2_decay


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

    def __init__(
        self, head_dim: int, num_heads: int, *, model_dim: int | None = None, chunk_size: int = 64,
        scale: float | None = None,
    ) -> None:
        super().__init__(head_dim, num_heads, model_dim=model_dim, chunk_size=chunk_size, scale=scale)
        self.dt_proj = nn.Parameter(torch.empty(num_heads, self.model_dim))  # w (H, model_dim)
        self.dt_bias = nn.Parameter(torch.empty(num_heads))  # (H,)
        self.a_log = nn.Parameter(torch.empty(num_heads))  # log A (H,)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.dt_proj, a=5**0.5)  # nn.Linear's default
        init_mamba2_decay(self.dt_bias, self.a_log)

    def gates(self, x: Tensor) -> tuple[Tensor, None]:
        return mamba2_decay(x, self.dt_proj, self.dt_bias, self.a_log), None  # (B, H, L, 1)
