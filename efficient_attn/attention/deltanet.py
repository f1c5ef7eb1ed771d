"""``deltanet``: the delta rule (Schlag et al. 2021; Yang et al., NeurIPS 2024, arXiv:2406.06484)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..registry import register_attention
from .gated import GatedRecurrentAttention, linear


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
    normalize_qk = True

    def __init__(
        self, head_dim: int, num_heads: int, *, model_dim: int | None = None, chunk_size: int = 64,
        scale: float | None = None,
    ) -> None:
        super().__init__(head_dim, num_heads, model_dim=model_dim, chunk_size=chunk_size, scale=scale)
        self.beta_proj = nn.Parameter(torch.empty(num_heads, self.model_dim))  # w (H, model_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.beta_proj, a=5**0.5)  # nn.Linear's default

    def gates(self, x: Tensor) -> tuple[None, Tensor]:
        return None, linear(x, self.beta_proj).sigmoid().transpose(1, 2)  # β (B, H, L)
