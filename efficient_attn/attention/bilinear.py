"""Luong et al. 2015 "general" (bilinear) attention."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..registry import register_attention
from .base import Attention, softmax_attention


@register_attention("bilinear")
class BilinearAttention(Attention):
    """Bilinear ("general") attention with one learned D×D matrix per head.

    score(q, k) = scale · qᵀ W_h k,  out = softmax(scores) V;  O(L·d² + L·S·d) time, O(L·S) memory
    at most. scale defaults to 1 (Luong's formula); W_h starts as the identity, so the variant
    starts from unscaled dot-product attention and learns a metric from there.
    Masks: key padding yes; causal yes.
    """

    def __init__(self, head_dim: int, num_heads: int, *, scale: float = 1.0) -> None:
        super().__init__(head_dim, num_heads)
        if not scale > 0:
            raise ValueError(f"scale must be positive, got {scale!r}")
        self.scale = float(scale)
        self.weight = nn.Parameter(torch.empty(num_heads, head_dim, head_dim))  # (H, D, D)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            eye = torch.eye(self.head_dim)
            noise = torch.randn(self.num_heads, self.head_dim, self.head_dim) / math.sqrt(self.head_dim)
            self.weight.copy_(eye + 0.1 * noise)  # near-identity, not symmetric, distinct per head

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, causal: bool
    ) -> Tensor:
        qw = torch.einsum("bhld,hde->bhle", q, self.weight.to(q.dtype))  # (B, H, L, D): qᵀ W_h
        return softmax_attention(qw, k, v, key_padding_mask, causal, self.scale)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale={self.scale:.4g}"
