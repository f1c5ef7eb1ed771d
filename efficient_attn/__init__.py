"""efficient-attn: attention mechanisms behind one registry and one interface.

This package owns the public API: the registry (create, list, register attentions), the core
``Attention`` interface, the multi-head wrapper, the seeding hooks and the auxiliary-loss helper.

    import efficient_attn as ea
    ea.list_attentions()                       # every registered name, sorted
    attn = ea.create_attention("favor", head_dim=64, num_heads=8, num_features=256)
    out = attn(q, k, v, key_padding_mask=None, causal=True)   # (B, H, L, D) in, (B, H, L, Dv) out

The names below load on first use (PEP 562), so ``import efficient_attn`` and the command lines'
``--help`` (``efficient_attn_tasks``) do not import torch; every built-in attention is registered
before any of them is returned.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {  # public name -> the submodule that defines it
    "Attention": ".attention",
    "KernelAttention": ".attention",
    "attention_aux_loss": ".aux_loss",
    "MultiHeadAttention": ".multihead",
    "attention_options": ".registry",
    "create_attention": ".registry",
    "get_attention_class": ".registry",
    "import_attentions": ".registry",
    "list_attentions": ".registry",
    "register_attention": ".registry",
    "attention_optimizer_step": ".seeding",
    "module_seed": ".seeding",
    "seed_attentions": ".seeding",
}
_SUBMODULES = {
    "analysis", "attention", "aux_loss", "generate", "layers", "multihead", "ops", "registry", "seeding", "spec",
    "transfer", "transformer",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # the same names for type checkers, re-exported explicitly (``X as X``)
    from .attention import Attention as Attention
    from .attention import KernelAttention as KernelAttention
    from .aux_loss import attention_aux_loss as attention_aux_loss
    from .multihead import MultiHeadAttention as MultiHeadAttention
    from .registry import attention_options as attention_options
    from .registry import create_attention as create_attention
    from .registry import get_attention_class as get_attention_class
    from .registry import import_attentions as import_attentions
    from .registry import list_attentions as list_attentions
    from .registry import register_attention as register_attention
    from .seeding import attention_optimizer_step as attention_optimizer_step
    from .seeding import module_seed as module_seed
    from .seeding import seed_attentions as seed_attentions


def __getattr__(name: str) -> Any:
    """Import ``name``'s submodule on first access (after the variants, so the registry is full)."""
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    importlib.import_module(".attention", __name__)  # registers every built-in variant
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """Module attributes plus the lazily loaded names."""
    return sorted({*globals(), *_EXPORTS, *_SUBMODULES})
