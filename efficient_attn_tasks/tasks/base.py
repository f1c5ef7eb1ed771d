"""What every task shares: the task protocol, the data and Lightning module bases, the optimiser and schedule.

A task is a module ``tasks/<name>.py`` (mqar.py is the smallest) and a config ``configs/task/<name>.yaml``.
The module holds, in this order: constants (``ATTENTION_SITES``); ``Config``, its ``task:`` section, registered
with ``@register_task``; ``task_config`` (:func:`task_section`); data helpers that take the ``Config``; a
:class:`TaskData`; a :class:`TaskModule`; ``build(cfg)`` and, where ``build`` reads data, ``restore(cfg,
checkpoint)``. tests/test_task_protocol.py checks every task the registry knows.
"""

from __future__ import annotations

import functools
import math
import random
import sys
from pathlib import Path
from typing import Any, Callable, TypeVar

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from torchmetrics import MeanMetric

from efficient_attn import attention_aux_loss, attention_optimizer_step
from efficient_attn.transformer import count_parameters
from efficient_attn_tasks.config.schema import OptimConfig
from efficient_attn_tasks.run.distributed import all_reduce_sum, world_size
from efficient_attn_tasks.tasks.data import cache_dir as resolve_cache_dir
from efficient_attn_tasks.tasks.data import data_dir as resolve_data_dir
from efficient_attn_tasks.tasks.sampling import GlobalBatches, eval_loader, shuffled, train_loader

Schema = TypeVar("Schema")
SPLITS = ("train", "val", "test")
EVAL_SPLITS = ("val", "test")


def task_section(cfg: DictConfig, schema: type[Schema]) -> Schema:
    """The ``task:`` group as a checked ``schema`` (unknown keys are a TypeError, bad values a ValueError);
    every task's ``task_config`` is this with its ``Config``."""
    return schema(**OmegaConf.to_container(cfg.task, resolve=True))


class OneLength:
    """Mixin for a task section whose sequences all have the length of one field, named by ``longest_from``
    (``"task.<field>"``): that length is its ``longest_sequence``, the default ``model.max_len``."""

    longest_from: str

    @property
    def longest_sequence(self) -> int:
        return getattr(self, self.longest_from.removeprefix("task."))


def check_positive(section: Any, names: tuple[str, ...]) -> None:
    """ValueError naming the first of the fields ``names`` of a task section that is not a positive int."""
    for name in names:
        value = getattr(section, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"task.{name} must be a positive int, got {value!r}")


def data_options(cfg: DictConfig) -> dict[str, Any]:
    """The run-level values a data module takes besides its task section (:class:`TaskData`'s keywords)."""
    return {"seed": cfg.get("seed") or 0, "data_dir": cfg.get("data_dir"), "cache_dir": cfg.get("cache_dir"),
            "max_len": cfg.model.get("max_len")}


NAN = float("nan")  # the evaluation means' nan_strategy: a NaN value stays NaN (see TaskModule.__init__)


class TaskData(pl.LightningDataModule):
    """A task's splits and their loaders; a task supplies ``load_splits`` and only what differs.

    ``load_splits()`` returns ``{split: data}`` once (``setup``); a task adds no ``__init__``. It may override
    ``collate_fn`` (a ``staticmethod``), ``dataset(split)``, ``train_batches`` and ``eval_dataloader``. The
    keywords are the run's (:func:`data_options`): ``seed`` (batch order), ``data_dir`` / ``cache_dir``
    (resolved by efficient_attn_tasks/tasks/data.py into ``data_root`` / ``cache_root``) and ``max_len``
    (``model.max_len``, for a task whose data must fit the model).
    """

    collate_fn: Callable[[list[Any]], Any] | None = None

    def __init__(self, task: Any, *, seed: int = 0, data_dir: str | Path | None = None,
                 cache_dir: str | Path | None = None, max_len: int | None = None) -> None:
        super().__init__()
        self.task, self.seed, self.max_len = task, seed, max_len
        self.data_root, self.cache_root = resolve_data_dir(data_dir, cache_dir), resolve_cache_dir(cache_dir)
        self.splits: dict[str, Any] = {}
        self.dropped: dict[str, int] = {}  # examples a split lost while loading (e.g. too long), if any

    def load_splits(self) -> dict[str, Any]:
        """``{split: data}`` for train, val and test."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if not self.splits:
            self.splits = self.load_splits()

    def dataset(self, split: str) -> Any:
        """What the loaders of ``split`` read (a ``Dataset`` or a sequence)."""
        return self.splits[split]

    def train_batches(self, data: Any) -> tuple[GlobalBatches, int]:
        """(epoch -> that epoch's global batches, batches per epoch) for the training ``data``."""
        size = self.task.batch_size
        return shuffled(len(data), size, self.seed), -(-len(data) // size)

    def loader_args(self, collate_fn: Callable[[list[Any]], Any] | None = None) -> dict[str, Any]:
        """The DataLoader arguments every loader of the task shares (``collate_fn`` replaces the task's)."""
        workers = self.task.num_workers
        return {"collate_fn": collate_fn or self.collate_fn, "num_workers": workers, "persistent_workers": workers > 0}

    def train_dataloader(self) -> DataLoader:
        data = self.dataset("train")
        batches, count = self.train_batches(data)
        return train_loader(data, batches, count, self.trainer, self.seed, **self.loader_args())

    def val_dataloader(self) -> DataLoader:
        return self.eval_dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self.eval_dataloader("test")

    def eval_dataloader(self, split: str) -> DataLoader:
        return eval_loader(self.dataset(split), self.task.batch_size, **self.loader_args())


class TaskModule(pl.LightningModule):
    """Optimiser, schedule, token counting and shared logging; subclasses own model, loss and metrics.

    Checkpoints also hold the data position (epoch, batches trained in it) and every RNG state, so
    a run resumed from a mid-epoch checkpoint trains on the same batches with the same dropout
    masks as the uninterrupted run (see ``efficient_attn_tasks/tasks/sampling.py``).
    """

    monitor: str = "val/loss"
    monitor_mode: str = "min"
    eval_means: tuple[str, ...] = ("loss",)  # evaluation metrics, each a weighted mean per split (accumulate)
    eval_dtype: torch.dtype = torch.float32  # what their sums are kept in

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Every task's ``training_step`` adds the attentions' auxiliary losses (one place for all tasks)."""
        super().__init_subclass__(**kwargs)
        if "training_step" in cls.__dict__:
            cls.training_step = _with_attention_aux_loss(cls.__dict__["training_step"])

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__()
        self.optim_cfg = OptimConfig(**OmegaConf.to_container(cfg.optim, resolve=True))
        self.save_hyperparameters({"config": OmegaConf.to_container(cfg, resolve=True)})
        self.resume_position: dict[str, int] | None = None  # set when restored from a checkpoint
        # no state in checkpoints (torchmetrics states are not persistent). A NaN value makes the mean NaN:
        # never dropped, so a broken evaluation cannot look fine. nan_strategy=float("nan") replaces a NaN by
        # NaN and keeps the weights; "disable" would do the same but sets every weight to 1 (a torchmetrics
        # bug: Lightning-AI/torchmetrics#3434), "warn"/"ignore" drop it (the default)
        self.means = torch.nn.ModuleDict()
        self.add_eval_means(type(self).eval_means)

    def add_eval_means(self, names: tuple[str, ...]) -> None:
        """Evaluation means beyond the class's ``eval_means`` (names that depend on the config), one per split."""
        self.eval_means = tuple(dict.fromkeys((*self.eval_means, *names)))
        self.means.update({f"{split}_{name}": MeanMetric(nan_strategy=NAN).set_dtype(self.eval_dtype)
                           for split in EVAL_SPLITS for name in names})

    def accumulate(self, split: str, name: str, value: torch.Tensor, weight: Any = None) -> None:
        """Add ``value`` (one number, or one per item) with ``weight`` (default 1 each) to the mean
        ``split/name`` (one of ``eval_means``), logged at the end of the evaluation epoch."""
        self.means[f"{split}_{name}"].update(value, weight=weight)

    def log_means(self, split: str) -> dict[str, torch.Tensor]:
        """Log ``split/<name>`` for every mean of ``eval_means`` updated this epoch, and reset them;
        returns them (as logged). The means are summed over every process (torchmetrics' sync):
        a split that every process evaluates whole has the same mean, a sharded one the whole split's."""
        logged = {}
        for name in self.eval_means:
            metric = self.means[f"{split}_{name}"]
            if not metric.update_called:
                continue
            # in the default dtype, as a number logged by self.log is
            logged[name] = metric.compute().to(torch.get_default_dtype())
            metric.reset()
            self.log(f"{split}/{name}", logged[name], batch_size=1)
        return logged

    def on_validation_epoch_end(self) -> None:
        self.log_means("val")

    def on_test_epoch_end(self) -> None:
        self.log_means("test")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        loop = checkpoint.get("loops", {}).get("fit_loop") or self.trainer.fit_loop.state_dict()
        checkpoint["data_position"] = loop_position(loop, self.trainer.num_training_batches)
        checkpoint["rng_states"] = rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.resume_position = resume_position(checkpoint, self._trainer)
        if "rng_states" in checkpoint:
            set_rng_states(checkpoint["rng_states"])

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """The optimizer step (its learning rate logged as ``train/lr``), then the attentions' step
        hooks (FAVOR+ redraw schedules).

        Lightning calls this once per real step (after the last of ``accumulate_grad_batches``
        micro-batches), before ``on_train_batch_end``, so checkpoints saved there include the hooks' effect.
        The step that reaches the run's cap (``trainer.estimated_stepping_batches``: max_steps, or max_epochs
        × steps per epoch) is the final one: FAVOR+ does not redraw there (features no step trains with).
        """
        self.log("train/lr", float(optimizer.param_groups[0]["lr"]), on_step=True, on_epoch=False)
        step = self.trainer.global_step  # steps completed before this one
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        cap = self.trainer.estimated_stepping_batches  # -1 or inf: no step cap (max_time, an endless loader)
        attention_optimizer_step(self, final=0 < cap <= step + 1)

    def forward(self, batch: Any) -> torch.Tensor:
        """The model's output (logits) for one batch as the data module yields it."""
        raise NotImplementedError

    def batch_tokens(self, batch: Any) -> int:
        """Tokens the model processed in one training batch (non-padding, inputs and targets)."""
        raise NotImplementedError

    def eval_step(self, batch: Any, split: str) -> None:
        """Add one evaluation batch of ``split`` (val or test) to its means (:meth:`accumulate`)."""
        raise NotImplementedError

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.eval_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.eval_step(batch, "test")

    def global_mean(self, mean: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(the loss to backpropagate, the loss to log) from this process's ``mean`` loss over its ``count``
        loss terms (tokens, queries, examples) of the step's global batch.

        DDP averages the processes' gradients; a per-process mean would then weight a process with few
        tokens as much as one with many (a mean of means, not one process's mean over the same global
        batch). Scaled by ``count · world / global count`` instead, the average of the gradients is the
        gradient of (sum of every process's terms) / (global count): what one process computes (fairseq
        normalises so too). The logged loss is that global mean. One process: ``mean`` as it is.
        """
        world = world_size()
        if world == 1:
            return mean, mean.detach()
        local = torch.stack([mean.detach().double() * count, torch.tensor(float(count), dtype=torch.float64,
                                                                            device=mean.device)])
        total, global_count = all_reduce_sum(local).tolist()  # one collective for both
        return mean * (count * world / global_count), torch.tensor(total / global_count, device=mean.device)

    def num_parameters(self) -> int:
        return count_parameters(self.model)

    def configure_optimizers(self) -> dict[str, Any]:
        o = self.optim_cfg
        decay = [p for n, p in self.named_parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for n, p in self.named_parameters() if p.requires_grad and p.dim() < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=o.lr,
            betas=tuple(o.betas),
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _lr_factor(self, step: int) -> float:
        o, step = self.optim_cfg, step + 1
        warm = min(1.0, step / max(1, o.warmup_steps))
        if o.schedule == "constant":
            return warm
        if o.schedule == "inverse_sqrt":
            return warm * math.sqrt(max(1, o.warmup_steps) / max(step, o.warmup_steps))
        if o.schedule == "cosine":
            total = max(1, self._horizon())
            progress = min(1.0, max(0, step - o.warmup_steps) / max(1, total - o.warmup_steps))
            return warm * 0.5 * (1.0 + math.cos(math.pi * progress))
        raise ValueError(f"optim.schedule must be inverse_sqrt, cosine or constant, got {o.schedule!r}")

    def _horizon(self) -> int:
        """Steps the cosine schedule decays over: ``optim.total_steps`` when set (e.g. to stop a run early
        on the schedule of a longer one), else the steps the run will take: ``trainer.max_steps`` when set
        (or fewer if the epochs end first), else epochs × steps per epoch; a time budget alone has none."""
        if self.optim_cfg.total_steps is not None:
            return int(self.optim_cfg.total_steps)
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            from efficient_attn_tasks.config.checks import COSINE_HORIZON, ConfigError

            raise ConfigError(COSINE_HORIZON)
        return int(total)


def _with_attention_aux_loss(step: Any) -> Any:
    """Wrap a task's ``training_step``: its loss plus ``attention_aux_loss`` of the module's attentions
    (Hedgehog's distillation when ``attention.kwargs.distill`` > 0), logged as ``train/aux_loss``.

    ``train/loss`` stays the task's loss; the returned loss (what is optimised) includes the auxiliary
    one. Reading the losses clears them, so a ``training_step`` that calls ``super()``'s adds them once.
    """

    @functools.wraps(step)
    def training_step(self: TaskModule, *args: Any, **kwargs: Any) -> Any:
        out = step(self, *args, **kwargs)
        aux = attention_aux_loss(self)
        if aux is None or out is None:
            return out
        self.log("train/aux_loss", aux.detach(), on_step=True, on_epoch=False)
        if isinstance(out, dict):
            return {**out, "loss": out["loss"] + aux}
        return out + aux

    return training_step


def loop_position(fit_loop: dict[str, Any], num_batches: float | None = None) -> dict[str, int]:
    """Where Lightning's fit loop in state ``fit_loop`` (``FitLoop.state_dict()``, a checkpoint's
    ``loops.fit_loop``) resumes: ``{"epoch": e, "batches": n}``, epoch e with its first n batches trained.

    Batches are this process's loader batches (micro-batches under accumulation); a resumed loader skips
    them (``ShardedBatches.resume_at``). They are the batch progress's ``processed``: the batches whose step
    ran, what Lightning restores its own progress to. An epoch whose batches all ran (its last batch, or
    ``num_batches`` of them) resumes at the next epoch's start; so does a state saved in the epoch's end hooks
    (``processed`` epochs ahead of ``completed``). Saved in its start hooks, an epoch has no batch run yet.
    Saved after a fit that stopped mid-epoch (``max_steps``, early stopping), the loop counts that epoch as
    completed; the data position stays in it (a longer run resumed there trains the batches it left).
    """
    epochs, progress = fit_loop["epoch_progress"]["current"], fit_loop["epoch_loop.batch_progress"]
    epoch, batches = epochs["completed"], progress["current"]  # completed epochs: trainer.current_epoch
    if epochs["processed"] > epoch:
        return {"epoch": epoch + 1, "batches": 0}
    if epochs["started"] < epochs["ready"]:
        return {"epoch": epoch, "batches": 0}
    done = batches["processed"]
    if (progress["is_last_batch"] and done == batches["ready"]) or (num_batches is not None and done >= num_batches):
        return {"epoch": epoch + 1, "batches": 0}
    if done and epochs["ready"] == epoch:  # no epoch in progress: the fit ended in the one it counts as completed
        return {"epoch": epoch - 1, "batches": done}
    return {"epoch": epoch, "batches": done}


def resume_position(checkpoint: dict[str, Any], trainer: Any = None) -> dict[str, int] | None:
    """The data position a run restored from ``checkpoint`` resumes at: its ``data_position`` where that
    agrees with its fit loop state (:func:`loop_position`), else the loop's, with a one-line warning: a
    loader that resumed elsewhere would end the epoch short of Lightning's count of its batches, and that
    epoch would neither validate nor checkpoint. A position one epoch on from the loop's batch count is the
    loop's too (an epoch cut short by ``trainer.limit_train_batches``, which the state alone does not hold)."""
    saved, loop = checkpoint.get("data_position"), checkpoint.get("loops", {}).get("fit_loop")
    if saved is None or not loop or (trainer is not None and trainer.state.fn != "fit"):  # test: no training data
        return saved
    where = loop_position(loop)
    if saved == where or (saved == {"epoch": where["epoch"] + 1, "batches": 0} and where["batches"] > 0):
        return saved
    if trainer is None or trainer.is_global_zero:
        path = Path(getattr(trainer, "ckpt_path", None) or "checkpoint").name
        print(f"warning: checkpoint {path}: data position epoch {saved['epoch']}, {saved['batches']} batches "
              f"disagrees with its training loop (epoch {where['epoch']}, {where['batches']} batches); resuming "
              "where the loop stands", file=sys.stderr, flush=True)
    return where


def rng_states() -> dict[str, Any]:
    """torch (CPU and CUDA), Python and NumPy RNG states."""
    import numpy as np

    name, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]  # loadable with weights_only
    states = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy_state}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    name, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
