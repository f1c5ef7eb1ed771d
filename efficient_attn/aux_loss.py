"""Auxiliary training losses that attentions produce in their forward (Hedgehog's distillation).

Owns :func:`attention_aux_loss`, which collects them for the training loss after each forward. A core
attention with such a loss sets ``aux_loss`` (a scalar tensor, already weighted) in each training-mode
forward, and None otherwise (see :class:`~efficient_attn.attention.base.Attention`).
"""

from __future__ import annotations

from torch import Tensor, nn

from .attention.base import Attention


def attention_aux_loss(model: nn.Module) -> Tensor | None:
    """The sum of every core attention's pending ``aux_loss`` in ``model``, or None if none has one.

    Each one is cleared (set to None) as it is read, so a loss is added once and no attention keeps
    the graph of a finished step alive; call once per training forward.
    """
    total = None
    for module in model.modules():
        if isinstance(module, Attention) and module.aux_loss is not None:
            total = module.aux_loss if total is None else total + module.aux_loss
            module.aux_loss = None
    return total
