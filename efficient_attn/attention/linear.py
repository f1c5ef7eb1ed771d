"""Katharopoulos et al. 2020 linear attention ("Transformers are RNNs")."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ..registry import register_attention
from .kernel import KernelAttention


@register_attention("linear")
class LinearAttention(KernelAttention):
    """Linear attention with the elu+1 feature map.

    out_i = φ(q_i)ᵀ Σ_j φ(k_j) v_jᵀ / φ(q_i)ᵀ Σ_j φ(k_j),  φ(x) = elu(x) + 1 (M = D features).
    O(L·D·Dv) time; O(L·(D+Dv)) memory; causal by chunked prefix sums (``chunk_size``).
    Masks: key padding yes; causal yes.
    """

    def __init__(self, head_dim: int, num_heads: int, *, chunk_size: int = 64, recompute: bool = True) -> None:
        super().__init__(head_dim, num_heads, chunk_size=chunk_size, recompute=recompute)

    def feature_map(self, x: Tensor, is_query: bool, *, fresh_grad: bool = False) -> tuple[Tensor, None]:
        return F.elu(x) + 1.0, None  # (B, H, N, D), exact as returned
