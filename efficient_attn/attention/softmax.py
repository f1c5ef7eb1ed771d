"""Scaled dot-product attention (Vaswani et al. 2017)."""

from __future__ import annotations

import math

from torch import Tensor

from ..registry import register_attention
from .base import Attention, softmax_attention


@register_attention("softmax")
class SoftmaxAttention(Attention):
    """Scaled dot-product attention.

    out = softmax(scale · Q Kᵀ) V with scale = 1/√d by default;  O(L·S·d) time, and O(L·S) memory
    at most (``F.scaled_dot_product_attention`` picks a fused kernel that often needs less).
    Masks: key padding yes; causal yes.
    """

    def __init__(self, head_dim: int, num_heads: int, *, scale: float | None = None) -> None:
        super().__init__(head_dim, num_heads)
        if scale is not None and not scale > 0:
            raise ValueError(f"scale must be positive, got {scale!r}")
        self.scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, causal: bool
    ) -> Tensor:
        return softmax_attention(q, k, v, key_padding_mask, causal, self.scale)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale={self.scale:.4g}"
