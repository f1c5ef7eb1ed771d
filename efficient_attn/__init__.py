"""efficient-attn: attention mechanisms behind one registry and one interface.

    import efficient_attn as ea
    ea.list_attentions()                       # ['additive', 'bilinear', 'dot', 'favor', 'linear', 'softmax']
    attn = ea.create_attention("favor", head_dim=64, num_heads=8, num_features=256)
    out = attn(q, k, v, key_padding_mask=None, causal=True)   # (B, H, L, D) in, (B, H, L, Dv) out
"""

from .attention import Attention, KernelAttention
from .aux_loss import attention_aux_loss
from .multihead import MultiHeadAttention
from .registry import (
    attention_options,
    create_attention,
    get_attention_class,
    list_attentions,
    register_attention,
)
from .seeding import attention_optimizer_step, module_seed, seed_attentions

__version__ = "0.1.0"

__all__ = [
    "Attention",
    "KernelAttention",
    "MultiHeadAttention",
    "attention_aux_loss",
    "attention_optimizer_step",
    "attention_options",
    "create_attention",
    "get_attention_class",
    "list_attentions",
    "module_seed",
    "register_attention",
    "seed_attentions",
]
