"""``gated_deltanet``: the delta rule with Mamba-2's decay (Yang, Kautz & Hatamizadeh, ICLR 2025, arXiv:2412.06464)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..registry import register_attention
from .gated import GatedRecurrentAttention, init_mamba2_decay, linear, mamba2_decay


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
    normalize_qk = True

    def __init__(
        self, head_dim: int, num_heads: int, *, model_dim: int | None = None, chunk_size: int = 64,
        scale: float | None = None,
    ) -> None:
        super().__init__(head_dim, num_heads, model_dim=model_dim, chunk_size=chunk_size, scale=scale)
        self.beta_proj = nn.Parameter(torch.empty(num_heads, self.model_dim))  # w (H, model_dim)
        self.dt_proj = nn.Parameter(torch.empty(num_heads, self.model_dim))  # u (H, model_dim)
        self.dt_bias = nn.Parameter(torch.empty(num_heads))  # (H,)
        self.a_log = nn.Parameter(torch.empty(num_heads))  # log A (H,)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for weight in (self.beta_proj, self.dt_proj):
            nn.init.kaiming_uniform_(weight, a=5**0.5)  # nn.Linear's default
        init_mamba2_decay(self.dt_bias, self.a_log)

    def gates(self, x: Tensor) -> tuple[Tensor, Tensor]:
        beta = linear(x, self.beta_proj).sigmoid().transpose(1, 2)  # (B, H, L)
        return mamba2_decay(x, self.dt_proj, self.dt_bias, self.a_log), beta  # (B, H, L, 1), (B, H, L)
