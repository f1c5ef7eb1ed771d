"""Which registered attention each attention site of a model uses: :class:`AttentionSpec` (a name, the core's
options, the layer options), the sites (:data:`SITE_USE`: encoder, decoder, cross) and the per-layer check
(:func:`layer_specs`).

Self-attention sites take one spec (every layer) or a sequence of exactly one per layer (a hybrid such as Based:
sliding-window and Taylor linear-attention layers); every layer is checked for its site, so a variant that cannot
serve there is refused when the model is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from .attention.base import unsupported_use
from .multihead import check_layer_options
from .registry import attention_options, get_attention_class

# How each attention site calls its core: decoder self-attention is causal; cross-attention reads
# another sequence (S ≠ L). Variants that cannot serve a site (``Attention.supports_*``) are refused.
SITE_USE = {
    "encoder": {"causal": False, "cross": False},
    "decoder": {"causal": True, "cross": False},
    "cross": {"causal": False, "cross": True},
}


@dataclass
class AttentionSpec:
    """Which registered attention an attention site uses, its options (``kwargs``, the core's) and its
    layer options (``layer``: :class:`~efficient_attn.multihead.MultiHeadAttention`'s ``short_conv``,
    ``output_norm``, ``output_gate``; empty = the plain layer)."""

    name: str = "softmax"
    kwargs: dict[str, Any] = field(default_factory=dict)
    layer: dict[str, Any] = field(default_factory=dict)

    def check(self, where: str, site: str | None = None) -> None:
        """Name and options exist; with ``site`` (a :data:`SITE_USE` key) the attention can also serve
        there (a causal-only variant is no encoder), else ``ValueError`` naming the site."""
        try:
            cls = get_attention_class(self.name)  # ValueError naming the known attentions
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        unknown = sorted(set(self.kwargs) - set(attention_options(self.name)))
        if unknown:
            raise TypeError(
                f"{where}: attention {self.name!r} has no option(s) {unknown}; "
                f"accepted: {attention_options(self.name)}"
            )
        try:
            check_layer_options(**self.layer)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        problem = None if site is None else unsupported_use(cls, **SITE_USE[site])
        if site is not None and SITE_USE[site]["cross"] and self.layer.get("short_conv"):
            problem = ("short_conv is for self-attention only (it convolves each position's own q, k, v); "
                       "set layer.short_conv: 0 for cross-attention")
        if problem:
            raise ValueError(f"{where}: attention {self.name!r} cannot serve as {site} attention: {problem}")


def layer_specs(attention: Any, num_layers: int, where: str, site: str) -> list[AttentionSpec]:
    """One spec per layer of a stack, each checked for ``site`` (a :data:`SITE_USE` key).

    ``attention`` is one :class:`AttentionSpec` (every layer) or a sequence of exactly ``num_layers``
    (layer i uses entry i; no repetition: a Based-style pattern is tiled by the caller). A wrong
    length, or a layer whose attention cannot serve ``site``, is a ``ValueError`` naming the layer.
    """
    if isinstance(attention, AttentionSpec):
        attention.check(where, site)
        return [attention] * num_layers
    if isinstance(attention, (str, bytes)) or not isinstance(attention, Sequence):
        raise TypeError(f"{where}: expected an AttentionSpec or a sequence of them, got {attention!r}")
    specs = list(attention)
    if len(specs) != num_layers:
        raise ValueError(
            f"{where}: {len(specs)} per-layer attention(s) for {num_layers} layer(s); give one AttentionSpec "
            f"(every layer) or exactly one per layer"
        )
    for i, spec in enumerate(specs):
        if not isinstance(spec, AttentionSpec):
            raise TypeError(f"{where}, layer {i}: expected an AttentionSpec, got {spec!r}")
        spec.check(f"{where}, layer {i}", site)
    return specs
