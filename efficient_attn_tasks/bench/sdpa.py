"""The benchmark's ``F.scaled_dot_product_attention`` baselines: default dispatch or one pinned backend.

``sdpa`` lets torch pick the kernel (on a recent GPU in bf16/fp16 that is usually FlashAttention;
in fp32 the memory-efficient kernel; on CPU its own fused kernel). ``sdpa_flash`` pins the flash
backend (``torch.nn.attention.sdpa_kernel(SDPBackend.FLASH_ATTENTION)``), so a row labelled flash
really ran FlashAttention or failed, instead of silently falling back to another kernel.
Imports no torch at module level (``efficient-attn-bench --help`` stays fast).
"""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager

SDPA_BACKENDS = {"sdpa": None, "sdpa_flash": "FLASH_ATTENTION"}  # baseline name -> pinned SDPBackend


def sdpa_backend(name: str) -> ContextManager[Any]:
    """The context that pins ``name``'s SDPA backend; a no-op for ``sdpa`` and for every other name."""
    backend = SDPA_BACKENDS.get(name)
    if backend is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(getattr(SDPBackend, backend))


def sdpa_unavailable(name: str, device: str, dtype: str) -> str | None:
    """Why the baseline ``name`` cannot run on ``device`` in ``dtype`` (recorded as ``n/a``), else None."""
    if SDPA_BACKENDS.get(name) != "FLASH_ATTENTION":
        return None
    try:
        from torch.nn.attention import sdpa_kernel  # noqa: F401
    except ImportError:
        return "needs torch.nn.attention.sdpa_kernel (torch >= 2.3)"
    if device.startswith("cuda") and dtype == "fp32":
        return "FlashAttention on CUDA runs in fp16/bf16 only"
    return None
