"""Training batches that are seeded per epoch, sharded across processes and resumable mid-epoch.

An epoch is a list of global batches in an order seeded by ``(seed, epoch)``; process r of w takes
``batch[r::w]`` of each, so a DDP run trains on the same data, step for step, as one process, and a run
resumed mid-epoch skips the batches already trained. Evaluation runs the whole split on every process or shares
it out by whole batches. Loaders draw from their own seeded generators, never from torch's global RNG (which
feeds dropout and is saved with the checkpoint).
"""

from __future__ import annotations

import random
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

GlobalBatches = Callable[[int], list[list[int]]]  # epoch -> that epoch's global batches


class ShardedBatches(Sampler[list[int]]):
    """This process's share of every global batch of an epoch; skips batches already trained on."""

    def __init__(self, global_batches: GlobalBatches, num_batches: int, rank: int = 0, world: int = 1) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank must be in [0, {world}), got {rank}")
        self.global_batches, self.num_batches, self.rank, self.world = global_batches, num_batches, rank, world
        self.epoch, self._skip = 0, None  # the epoch the next iteration yields

    def resume_at(self, epoch: int, batches: int) -> None:
        """The next iteration is ``epoch`` without its first ``batches`` global batches (trained before a restart).

        Epochs are counted by the iterations actually consumed, not taken from ``set_epoch``:
        Lightning starts the next epoch's iterator (prefetching) before it sets the epoch.
        """
        self._skip = (epoch, batches)

    def __iter__(self) -> Iterator[list[int]]:
        epoch, skip = self.epoch, 0
        if self._skip is not None:
            (epoch, skip), self._skip = self._skip, None
        self.epoch = epoch + 1
        for batch in self.global_batches(epoch)[skip:]:
            if len(batch) < self.world:  # a last partial batch too small to give every process an example
                continue
            yield batch[self.rank :: self.world]

    def __len__(self) -> int:
        return self.num_batches


def shuffled(num_examples: int, batch_size: int, seed: int) -> GlobalBatches:
    """A fresh permutation each epoch, cut into batches (the last may be partial)."""

    def batches(epoch: int) -> list[list[int]]:
        order = torch.randperm(num_examples, generator=_generator(seed, epoch)).tolist()
        return [order[i : i + batch_size] for i in range(0, num_examples, batch_size)]

    return batches


def by_length(lengths: Sequence[int], batch_size: int, seed: int) -> GlobalBatches:
    """Examples of similar length batched together (less padding), batches in a seeded random order."""

    def batches(epoch: int) -> list[list[int]]:
        g = random.Random(seed * 7919 + epoch)
        order = sorted(range(len(lengths)), key=lambda i: (lengths[i], g.random()))
        out = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        g.shuffle(out)
        return out

    return batches


def random_draws(population: int, num_samples: int, batch_size: int, seed: int) -> GlobalBatches:
    """``num_samples`` uniform draws (with replacement) from ``range(population)`` per epoch."""

    def batches(epoch: int) -> list[list[int]]:
        draws = torch.randint(population, (num_samples,), generator=_generator(seed, epoch)).tolist()
        return [draws[i : i + batch_size] for i in range(0, num_samples, batch_size)]

    return batches


def train_loader(data: Dataset, global_batches: GlobalBatches, num_batches: int, trainer: Any, seed: int,
                 **kwargs: Any) -> DataLoader:
    """The training loader for this process (rank and world size from ``trainer``, if attached).

    If the Lightning module was restored from a mid-epoch checkpoint (``resume_position``), the
    batches that epoch already trained on are skipped.
    """
    rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
    sampler = ShardedBatches(global_batches, num_batches, rank, world)
    position = getattr(getattr(trainer, "lightning_module", None), "resume_position", None)
    if position:
        sampler.resume_at(position["epoch"], position["batches"])
    return DataLoader(data, batch_sampler=sampler, generator=_generator(seed, -1), **kwargs)


def eval_loader(data: Dataset, batch_size: int, **kwargs: Any) -> DataLoader:
    """In order, the whole split on every process (each process's metrics are the whole split's)."""
    return DataLoader(data, batch_size=batch_size, shuffle=False, generator=_generator(0, -1), **kwargs)


def eval_shard(num_examples: int, batch_size: int, rank: int = 0, world: int = 1) -> list[list[int]]:
    """Process ``rank``'s batches of an evaluation split of ``num_examples``, each a list of example indices.

    The split is cut in order into batches of ``batch_size`` (as one process cuts it) and batch i
    goes to process i % world: every example is evaluated once, by one process, in the same batch
    as on one process (so its numbers are the same). A split of fewer than ``world`` such batches is
    cut into ``world`` near-equal ones instead: every process needs at least one (Lightning skips
    the evaluation loop of a process with none, and the others would wait for it at the gather).
    """
    if num_examples < world:
        raise ValueError(f"{num_examples} examples cannot give each of {world} processes one")
    batches = [list(range(i, min(i + batch_size, num_examples))) for i in range(0, num_examples, batch_size)]
    if len(batches) < world:
        bounds = [r * num_examples // world for r in range(world + 1)]
        batches = [list(range(bounds[r], bounds[r + 1])) for r in range(world)]
    return batches[rank::world]


class Indexed(Dataset):
    """``(i, data[i])``: examples that carry their index in the split (to put gathered results in order)."""

    def __init__(self, data: Sequence[Any]) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[int, Any]:
        return i, self.data[i]


def sharded_eval_loader(data: Sequence[Any], batch_size: int, trainer: Any, **kwargs: Any) -> DataLoader:
    """This process's share of an evaluation split (:func:`eval_shard`), as ``(index, example)`` items in
    order; the task gathers every process's results and orders them by index (e.g. for corpus BLEU).
    ``trainer.limit_val_batches`` / ``limit_test_batches`` then count each process's batches."""
    rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
    return DataLoader(Indexed(data), batch_sampler=eval_shard(len(data), batch_size, rank, world), **kwargs)


def _generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)
