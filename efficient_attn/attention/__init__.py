"""The attention variants, one file each, on the shared interface of ``base`` (and ``kernel`` for the
linear-attention family); importing this package registers every one of them."""

from . import (  # noqa: F401  (registration)
    additive,
    bilinear,
    cosformer,
    deltanet,
    dot,
    favor,
    gated_deltanet,
    gla,
    hedgehog,
    linear,
    mamba2,
    retention,
    sliding_window,
    softmax,
    taylor,
)
from .base import Attention
from .kernel import KernelAttention

__all__ = ["Attention", "KernelAttention"]
