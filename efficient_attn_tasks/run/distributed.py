"""Collectives over the processes of a DDP run that degrade to the identity on one process.

Used by the task modules' evaluation (corpus BLEU gathers every shard's hypotheses), the weighted means of
efficient_attn_tasks/tasks/base.py and the throughput callback; each is a no-op without an initialised
``torch.distributed`` group.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def world_size() -> int:
    """Processes in the default ``torch.distributed`` group (DDP), 1 when there is none."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """``values`` summed over every process (a copy; ``values`` itself on one process)."""
    if world_size() == 1:
        return values
    out = values.clone()
    dist.all_reduce(out)
    return out


def all_gather_stack(values: torch.Tensor) -> torch.Tensor:
    """(world, *values.shape): every process's ``values``, in rank order."""
    if world_size() == 1:
        return values[None]
    out = [torch.empty_like(values) for _ in range(world_size())]
    dist.all_gather(out, values)
    return torch.stack(out)


def all_gather_objects(obj: Any) -> list[Any]:
    """Every process's picklable ``obj``, in rank order (``[obj]`` on one process)."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out
