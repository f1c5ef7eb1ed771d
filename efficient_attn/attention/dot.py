"""Unscaled dot-product attention: the √d_k ablation of Vaswani et al. 2017 (footnote 4)."""

from __future__ import annotations

from torch import Tensor

from ..registry import register_attention
from .base import Attention, softmax_attention


@register_attention("dot")
class DotProductAttention(Attention):
    """Unscaled dot-product attention.

    out = softmax(Q Kᵀ) V;  O(L·S·d) time, O(L·S) memory at most.
    Logits grow like √d for unit-variance q, k, so softmax saturates as d grows: that is the point.
    Masks: key padding yes; causal yes.
    """

    def __init__(self, head_dim: int, num_heads: int) -> None:
        super().__init__(head_dim, num_heads)

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, causal: bool
    ) -> Tensor:
        return softmax_attention(q, k, v, key_padding_mask, causal, scale=1.0)
