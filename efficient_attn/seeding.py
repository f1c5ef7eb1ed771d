"""Seeds and schedules for what attentions own: their parameters, random features and redraws.

Owns the per-module seed (:func:`module_seed`), :func:`seed_attentions` and the once-per-optimizer-step
hook :func:`attention_optimizer_step` (FAVOR+ counts its redraws there). Each core attention draws from
its own stream, seeded by (base seed, the module's name in the model), so every module gets its own
features and parameters, the same in every process and on every rebuild, and the global RNG (which the
shared weights come from) is never touched.
"""

from __future__ import annotations

import zlib

import torch
from torch import nn

from .attention.base import Attention


def module_seed(base_seed: int, name: str) -> int:
    """A stable 32-bit seed for the module called ``name`` (e.g. ``decoder.layers.0.self_attn.attention``)."""
    return zlib.crc32(f"{base_seed}/{name}".encode())


def seed_attentions(model: nn.Module, base_seed: int | None = None) -> None:
    """Give every core attention in ``model`` its own stream: ``reset_random(module_seed(base, name))``.

    ``base_seed`` defaults to ``torch.initial_seed()`` (what ``torch.manual_seed`` and
    ``pytorch_lightning.seed_everything`` set); a module with an explicit ``seed`` option (FAVOR+)
    uses that instead, so its features do not depend on the run's seed but still differ per module.
    The global RNG state is left as it was.
    """
    base = torch.initial_seed() if base_seed is None else base_seed
    for name, module in model.named_modules():
        if isinstance(module, Attention):
            own = module.seed if module.seed is not None else base
            module.reset_random(module_seed(own, name))


def attention_optimizer_step(model: nn.Module, *, final: bool = False) -> None:
    """Call every core attention's ``optimizer_step`` hook; call once after each optimizer step
    (not per forward or per accumulated micro-batch): FAVOR+ counts its redraw interval here.
    ``final``: the run's last optimizer step (the caller knows its cap): ``final_optimizer_step`` instead,
    where FAVOR+ counts the step but never redraws (those features would meet no training)."""
    for module in model.modules():
        if isinstance(module, Attention):
            if final:
                module.final_optimizer_step()
            else:
                module.optimizer_step()
