"""``gla``: Gated Linear Attention (Yang et al., ICML 2024, arXiv:2312.06635)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import register_attention
from .gated import GatedRecurrentAttention, linear


@register_attention("gla")
class GatedLinearAttention(GatedRecurrentAttention):
    """S_t = Diag(α_t) S_{t−1} + k_tᵀ v_t,  o_t = (q_t/√D) S_t,  α_t = σ(x_t W₁ W₂ + b)^{1/τ} ∈ (0, 1)^D per head.

    The gate is a low-rank projection of the token (rank ``gate_rank`` = 16, τ = ``gate_temperature``
    = 16, as in the paper and flash-linear-attention's layer), one channel per key dimension, computed
    in log space: log α = logsigmoid(x W₁ W₂ + b)/τ. Output normalisation and the swish output gate of
    the paper's layer are ``MultiHeadAttention`` options (``output_norm``, ``output_gate``).
    Cost: O(L·C·D + L·D·Dv) time in chunks of C = ``chunk_size``, whose per-channel factors are
    pairwise only inside sub-blocks of 16 rows (O(L·16·D) memory), matrix products across them;
    O(D·Dv) per decoded token; state (B, H, D, Dv).
    Masks: causal self-attention only; padded positions leave the state unchanged (gate 1).
    """

    def __init__(
        self, head_dim: int, num_heads: int, *, model_dim: int | None = None, chunk_size: int = 64,
        scale: float | None = None, gate_rank: int = 16, gate_temperature: float = 16.0,
    ) -> None:
        super().__init__(head_dim, num_heads, model_dim=model_dim, chunk_size=chunk_size, scale=scale)
        if not isinstance(gate_rank, int) or isinstance(gate_rank, bool) or gate_rank < 1:
            raise ValueError(f"gate_rank must be a positive int, got {gate_rank!r}")
        if not gate_temperature > 0:
            raise ValueError(f"gate_temperature must be positive, got {gate_temperature!r}")
        self.gate_temperature = float(gate_temperature)
        self.gate_down = nn.Parameter(torch.empty(gate_rank, self.model_dim))  # W₁ (r, model_dim)
        self.gate_up = nn.Parameter(torch.empty(num_heads * head_dim, gate_rank))  # W₂ (H·D, r)
        self.gate_bias = nn.Parameter(torch.empty(num_heads * head_dim))  # b (H·D,)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's default initialisation for both projections and the bias."""
        for weight in (self.gate_down, self.gate_up):
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        bound = 1.0 / math.sqrt(self.gate_up.shape[1])
        nn.init.uniform_(self.gate_bias, -bound, bound)

    def gates(self, x: Tensor) -> tuple[Tensor, None]:
        logits = linear(linear(x, self.gate_down), self.gate_up, self.gate_bias)  # (B, L, H·D)
        log_gate = F.logsigmoid(logits) / self.gate_temperature  # (B, L, H·D)
        return log_gate.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2), None  # (B, H, L, D)

    def extra_repr(self) -> str:
        gate = f"gate_rank={self.gate_down.shape[0]}, gate_temperature={self.gate_temperature:g}"
        return f"{super().extra_repr()}, {gate}"
