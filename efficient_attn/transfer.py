"""Attention transfer: train a model's attention cores to reproduce exact softmax attention.

A model converted from a softmax checkpoint (its projections, embeddings and feed-forward weights loaded, its
attention cores fresh) first trains only the cores' own parameters, layer by layer, against the softmax
attention the checkpoint computed on the same q, k, v (LoLCATs' attention transfer, Zhang et al. 2024,
"LoLCATs: On Low-Rank Linearizing of Large Language Models"; Hedgehog's attention distillation, Zhang et al.
2024, ICLR). Inside :class:`AttentionTransfer` every core with trainable parameters computes, on each forward,

    teacher = softmax(q kᵀ/√D) v   (exact, masked as the core is: key padding, causal),
    loss    = a core's ``distill_loss(q, k, mask, causal)`` when it has one (Hedgehog: the cross-entropy
              of its attention weights against the softmax weights), else mean((core(q, k, v) − teacher)²),

and passes ``teacher`` on, so every later layer sees the checkpoint's activations and each layer's loss is
its own. The cores' inputs are detached: the losses reach the cores' own parameters and nothing else. A core
that has no parameters (FAVOR+, linear, softmax) is left alone. Plain PyTorch: the training loop that uses it
lives in the application (efficient_attn_tasks/run/transfer.py).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention.base import Attention
from .attention.softmax import SoftmaxAttention
from .multihead import MultiHeadAttention


def transfer_cores(model: nn.Module) -> list[tuple[str, Attention]]:
    """(name, core) of every :class:`MultiHeadAttention` core in ``model`` that has trainable parameters."""
    return [(f"{name}.attention" if name else "attention", mha.attention) for name, mha in model.named_modules()
            if isinstance(mha, MultiHeadAttention) and any(p.requires_grad for p in mha.attention.parameters())]


def transfer_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters of the cores :func:`transfer_cores` finds: what attention transfer trains."""
    return [p for _, core in transfer_cores(model) for p in core.parameters() if p.requires_grad]


def layer_options(mha: MultiHeadAttention) -> list[str]:
    """The layer options of ``mha`` that change what its core sees or what follows it (none: [])."""
    return [name for name, on in (("short_conv", mha.short_conv), ("output_norm", mha.output_norm),
                                  ("output_gate", mha.gate_proj is not None)) if on]


def check_transfer(model: nn.Module) -> None:
    """ValueError naming the first layer whose trained core has layer options (short convolution, output norm
    or gate): there the core's inputs, or what follows it, are not the softmax layer's."""
    for name, mha in model.named_modules():
        if isinstance(mha, MultiHeadAttention) and any(p.requires_grad for p in mha.attention.parameters()):
            options = layer_options(mha)
            if options:
                raise ValueError(f"{name}: attention transfer needs the attention's layer options off, but "
                                 f"{' and '.join(options)} set")


class AttentionTransfer:
    """Context manager: while inside, every core of :func:`transfer_cores` outputs exact softmax attention and
    adds its transfer loss (see the module docstring); :meth:`take` returns their mean and clears them.

    Entering raises :func:`check_transfer`'s ValueError for a layer with options.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.losses: list[Tensor] = []
        self._handles: list[Any] = []

    def __enter__(self) -> AttentionTransfer:
        check_transfer(self.model)
        for _, core in transfer_cores(self.model):
            teacher = SoftmaxAttention(core.head_dim, core.num_heads)
            self._handles.append(core.register_forward_pre_hook(_detached, with_kwargs=True))
            self._handles.append(core.register_forward_hook(self._hook(teacher), with_kwargs=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.losses.clear()

    def take(self) -> Tensor | None:
        """The mean transfer loss over the cores that ran since the last call (None if none ran); cleared."""
        if not self.losses:
            return None
        loss = torch.stack(self.losses).mean()
        self.losses.clear()
        return loss

    def _hook(self, teacher: SoftmaxAttention) -> Any:
        def hook(core: Attention, args: tuple, kwargs: dict[str, Any], out: Tensor) -> Tensor:
            q, k, v = args[:3]  # (B, H, L, D), (B, H, S, D), (B, H, S, Dv): the checkpoint's projections
            mask, causal = kwargs.get("key_padding_mask"), bool(kwargs.get("causal", False))
            with torch.no_grad():
                target = teacher(q, k, v, key_padding_mask=mask, causal=causal)  # (B, H, L, Dv)
            distill = getattr(core, "distill_loss", None)
            if distill is not None:
                if mask is not None:
                    k = k.masked_fill(mask[:, None, :, None], 0.0)  # (B, H, S, D): padded keys zeroed, as forward
                self.losses.append(distill(q, k, mask, causal))
            else:
                self.losses.append(F.mse_loss(out.float(), target.float()))
            return target

        return hook


def _detached(core: Attention, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """The core's inputs cut from the graph: the transfer loss reaches the core's own parameters only."""
    return tuple(a.detach() for a in args), {k: v.detach() if isinstance(v, Tensor) else v for k, v in kwargs.items()}
