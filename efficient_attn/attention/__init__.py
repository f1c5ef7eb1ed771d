"""Attention variants; importing this package registers every one of them."""

from . import additive, bilinear, dot, favor, linear, softmax  # noqa: F401  (registration)
from .base import Attention
from .kernel import KernelAttention

__all__ = ["Attention", "KernelAttention"]
