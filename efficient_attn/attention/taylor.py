"""Based (Arora et al. 2024, "Simple linear attention language models balance the recall-throughput
tradeoff"): linear attention with the 2nd-order Taylor feature map of exp."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..registry import register_attention
from .kernel import KernelAttention


@register_attention("taylor")
class TaylorAttention(KernelAttention):
    """Based's Taylor linear attention on a learned low-dimensional projection of q and k.

    q̃ = q W_h, k̃ = k W_h with W_h (D, d') per head (d' = ``feature_dim``), and
    φ(x) = [1, x/d'^{1/4}, (x ⊗ x)/(√2·√d')]  (M = 1 + d' + d'² features, the full outer product), so
    φ(q̃)·φ(k̃) = 1 + t + t²/2, t = q̃·k̃/√d': the 2nd-order Taylor expansion of exp(t), > 0 for every t
    (1 + t + t²/2 = ((1 + t)² + 1)/2 ≥ 1/2), so every normalizer of a row that sees a key is ≥ 1/2.
    out_i = φ(q̃_i)ᵀ Σ_j φ(k̃_j) v_jᵀ / φ(q̃_i)ᵀ Σ_j φ(k̃_j).
    O(L·M·Dv) time, O(L·M) memory; causal by chunked prefix sums (``chunk_size``), decoding with a
    constant (B, H, M, Dv+1) state. W_h starts as N(0, 1/D) entries (drawn by ``reset_parameters``,
    on the module's private stream inside a model) and is learned.
    Masks: key padding yes; causal yes.
    """

    def __init__(
        self, head_dim: int, num_heads: int, *, feature_dim: int = 16, chunk_size: int = 64, recompute: bool = True
    ) -> None:
        super().__init__(head_dim, num_heads, chunk_size=chunk_size, recompute=recompute)
        if not isinstance(feature_dim, int) or isinstance(feature_dim, bool) or feature_dim < 1:
            raise ValueError(f"feature_dim must be a positive int, got {feature_dim!r}")
        self.feature_dim = feature_dim
        self.weight = nn.Parameter(torch.empty(num_heads, head_dim, feature_dim))  # (H, D, d')
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.normal_(0.0, self.head_dim**-0.5)  # q̃ entries have q's mean square

    def feature_map(self, x: Tensor, is_query: bool, *, fresh_grad: bool = False) -> tuple[Tensor, None]:
        d = self.feature_dim
        xp = torch.einsum("bhnd,hde->bhne", x, self.weight.to(x.dtype))  # (B, H, N, d')
        # scaled on the d'-wide side: no second (B, H, N, d'²) tensor for the division and its gradient
        outer = (xp[..., :, None] * (xp / math.sqrt(2.0 * d))[..., None, :]).flatten(-2)  # (B, H, N, d'²)
        ones = torch.ones_like(xp[..., :1])  # (B, H, N, 1)
        features = [ones, xp / d**0.25, outer]  # outer: x̃_a x̃_b / (√2·√d')
        return torch.cat(features, dim=-1), None  # (B, H, N, 1 + d' + d'²), exact as returned

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, feature_dim={self.feature_dim}"
