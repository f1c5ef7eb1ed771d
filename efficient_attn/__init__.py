"""efficient-attn: attention mechanisms behind one registry and one interface.

    import efficient_attn as ea
    ea.list_attentions()                       # ['additive', 'bilinear', 'dot', 'favor', 'linear', 'softmax']
    attn = ea.create_attention("favor", head_dim=64, num_heads=8, num_features=256)
    out = attn(q, k, v, key_padding_mask=None, causal=True)   # (B, H, L, D) in, (B, H, L, Dv) out

The names below load on first use (PEP 562), so ``import efficient_attn_tasks.bench.kernels`` and the command
lines' ``--help`` do not import torch; every built-in attention is registered before any of them
is returned.
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
_SUBMODULES = {"analysis", "attention", "aux_loss", "generate", "multihead", "ops", "registry", "seeding", "transformer"}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .attention import Attention, KernelAttention
    from .aux_loss import attention_aux_loss
    from .multihead import MultiHeadAttention
    from .registry import (attention_options, create_attention, get_attention_class, import_attentions, list_attentions,
                           register_attention)
    from .seeding import attention_optimizer_step, module_seed, seed_attentions


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
    return sorted({*globals(), *_EXPORTS, *_SUBMODULES})
