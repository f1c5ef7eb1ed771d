"""Byte-level language modelling: next-byte prediction on a UTF-8 text, scored in bits per byte.

Vocabulary: the 256 byte values, no special tokens. Datasets: ``tinyshakespeare`` (split by
``task.split`` fractions), ``enwik8`` (the standard first 90M / next 5M / last 5M bytes) and
``file`` (any UTF-8 text file at ``task.path``, split by fractions). Training draws random
windows of ``context_length + 1`` bytes (input = window[:-1], target = window[1:]); validation and
test walk the split in contiguous windows whose targets tile it, so each byte after the split's
first is predicted once (a tail shorter than one window is dropped).
"""

from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor
from torch.utils.data import Dataset

from efficient_attn.transformer import TransformerLM
from efficient_attn_tasks.config.schema import attention_spec, transformer_config
from efficient_attn_tasks.tasks import register_task
from efficient_attn_tasks.tasks.base import OneLength, TaskData, TaskModule, check_positive, data_options, task_section
from efficient_attn_tasks.tasks.data import DataError, fetch
from efficient_attn_tasks.tasks.sampling import GlobalBatches, random_draws

VOCAB_SIZE = 256
ATTENTION_SITES = ("decoder",)  # the model's attention sites (check_config)
DATASETS = ("tinyshakespeare", "enwik8", "file")
ENWIK8_SPLIT = (90_000_000, 5_000_000)  # train, val bytes; test = the last 5M
Batch = dict[str, Tensor]


@register_task("lm")
@dataclass
class Config(OneLength):
    """The ``task:`` section for ``task=lm`` (configs/task/lm.yaml)."""

    name: str = "lm"
    dataset: str = "tinyshakespeare"  # tinyshakespeare | enwik8 | file
    path: str | None = None  # the text file when dataset=file
    context_length: int = 1024
    batch_size: int = 16
    train_batches_per_epoch: int = 1000
    eval_batches: int | None = None  # cap on val/test batches; None = the whole split
    split: tuple[float, float] = (0.9, 0.05)  # train, val fractions; test = the rest (not enwik8)
    num_workers: int = 0

    longest_from = "task.context_length"

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"task.dataset must be one of {list(DATASETS)}, got {self.dataset!r}")
        if self.dataset == "file" and not self.path:
            raise ValueError("task.dataset=file needs task.path (a UTF-8 text file)")
        check_positive(self, ("context_length", "batch_size", "train_batches_per_epoch"))
        if self.eval_batches is not None and (not isinstance(self.eval_batches, int) or self.eval_batches < 1):
            raise ValueError(f"task.eval_batches must be a positive int or null, got {self.eval_batches!r}")
        self.split = tuple(float(f) for f in self.split)
        if len(self.split) != 2 or min(self.split) <= 0 or sum(self.split) >= 1:
            raise ValueError(f"task.split must be two positive fractions (train, val) summing to < 1, got {self.split}")


def task_config(cfg: DictConfig) -> Config:
    """The ``task:`` group as a checked :class:`Config` (unknown keys are a TypeError)."""
    return task_section(cfg, Config)


# ----------------------------------------------------------------------------- data

def source_path(cfg: Config, root: Path) -> Path:
    """Where the dataset's file is, downloading (and verifying) a named dataset if it is missing."""
    if cfg.dataset == "tinyshakespeare":
        return fetch("tinyshakespeare/input.txt", root)
    if cfg.dataset == "enwik8":
        return fetch("enwik8/enwik8.zip", root)
    path = Path(cfg.path).expanduser()
    if not path.is_file():
        raise DataError(f"task.path {path} does not exist (or is not a file); dataset=file needs a UTF-8 text file")
    return path


def read_bytes(cfg: Config, path: Path) -> Tensor:
    """The dataset's raw bytes as a uint8 tensor (N,); a ``file`` must be UTF-8."""
    try:
        if cfg.dataset == "enwik8":
            with zipfile.ZipFile(path) as archive:
                raw = archive.read("enwik8")
        else:
            raw = path.read_bytes()
    except (OSError, KeyError, zipfile.BadZipFile) as err:
        raise DataError(f"cannot read {path}: {err} (corrupt or truncated file?); "
                        "delete it to download it again") from None
    if cfg.dataset == "file":
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"{path} is not UTF-8 text: {err}") from None
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)  # (N,)


def split_bytes(cfg: Config, data: Tensor) -> dict[str, Tensor]:
    """Train / val / test byte ranges: enwik8's standard 90M/5M/5M, else ``cfg.split`` fractions."""
    if cfg.dataset == "enwik8":
        n_train, n_val = ENWIK8_SPLIT
    else:
        n_train, n_val = (int(len(data) * f) for f in cfg.split)
    splits = {"train": data[:n_train], "val": data[n_train : n_train + n_val], "test": data[n_train + n_val :]}
    for name, part in splits.items():
        if len(part) < cfg.context_length + 1:
            raise ValueError(
                f"the {cfg.dataset} {name} split has {len(part)} bytes, fewer than one window of "
                f"context_length + 1 = {cfg.context_length + 1}; shorten task.context_length"
            )
    return splits


def window(data: Tensor, start: int, length: int) -> Batch:
    """Bytes [start, start + length] as input tokens (T,) and next-byte targets (T,)."""
    chunk = data[start : start + length + 1].long()  # (T+1,)
    return {"tokens": chunk[:-1], "targets": chunk[1:]}


class Windows(Dataset):
    """Windows of ``length`` tokens at given start offsets; item i starts at ``starts[i]``."""

    def __init__(self, data: Tensor, length: int, starts: range | None = None) -> None:
        self.data, self.length = data, length
        self.starts = starts if starts is not None else range(len(data) - length)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> Batch:
        return window(self.data, self.starts[index], self.length)


def eval_windows(data: Tensor, length: int, max_windows: int | None) -> Windows:
    """Contiguous windows whose targets tile ``data[1:]`` (the tail shorter than a window is dropped)."""
    count = (len(data) - 1) // length
    if max_windows is not None:
        count = min(count, max_windows)
    return Windows(data, length, range(0, count * length, length))


class ByteLMData(TaskData):
    """Downloads in ``prepare_data``, reads and splits in ``setup``; batches are dicts of (B, T) int64."""

    def prepare_data(self) -> None:
        source_path(self.task, self.data_root)

    def load_splits(self) -> dict[str, Tensor]:
        return split_bytes(self.task, read_bytes(self.task, source_path(self.task, self.data_root)))

    def dataset(self, split: str) -> Windows:
        """Training: every window of the split; val and test: contiguous windows (at most eval_batches' worth)."""
        if split == "train":
            return Windows(self.splits["train"], self.task.context_length)
        cap = None if self.task.eval_batches is None else self.task.eval_batches * self.task.batch_size
        return eval_windows(self.splits[split], self.task.context_length, cap)

    def train_batches(self, data: Windows) -> tuple[GlobalBatches, int]:
        """``train_batches_per_epoch`` batches of random windows (drawn with replacement) per epoch."""
        size, count = self.task.batch_size, self.task.train_batches_per_epoch
        return random_draws(len(data), count * size, size, self.seed), count


# ----------------------------------------------------------------------------- model
def bits(loss: Tensor) -> Tensor:
    """Cross-entropy in nats -> bits (per byte, i.e. per character for ASCII text)."""
    return loss / math.log(2)


class ByteLMModule(TaskModule):
    """Decoder-only Transformer over bytes; loss = mean next-byte cross-entropy, metric = bits per byte."""

    monitor = "val/bpc"
    monitor_mode = "min"
    eval_means = ("loss", "bpc")  # weighted by predicted bytes (the last batch may be smaller)

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg)
        self.task = task_config(cfg)
        model_cfg = transformer_config(cfg)
        if model_cfg.max_len < self.task.context_length:
            raise ValueError(
                f"task.context_length={self.task.context_length} exceeds model.max_len={model_cfg.max_len}; "
                "raise model.max_len (or shorten task.context_length)"
            )
        self.model = TransformerLM(model_cfg, VOCAB_SIZE, attention=attention_spec(cfg, "decoder"))

    def forward(self, batch: Batch) -> Tensor:
        return self.model(batch["tokens"])  # (B, T, 256)

    def loss(self, batch: Batch) -> Tensor:
        logits = self(batch)  # (B, T, V)
        return F.cross_entropy(logits.reshape(-1, VOCAB_SIZE), batch["targets"].reshape(-1))  # mean over B*T

    def batch_tokens(self, batch: Batch) -> int:
        return batch["tokens"].numel()

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        # over the global batch's tokens: processes hold unequal rows when task.batch_size % processes != 0
        loss, logged = self.global_mean(self.loss(batch), batch["targets"].numel())
        size = batch["tokens"].shape[0]
        self.log("train/loss", logged, on_step=True, on_epoch=False, prog_bar=True, batch_size=size)
        self.log("train/bpc", bits(logged), on_step=True, on_epoch=False, batch_size=size)
        return loss

    def eval_step(self, batch: Batch, split: str) -> None:
        loss, count = self.loss(batch), batch["targets"].numel()
        self.accumulate(split, "loss", loss, count)
        self.accumulate(split, "bpc", bits(loss), count)


def build(cfg: DictConfig) -> tuple[ByteLMData, ByteLMModule]:
    """The data module and the Lightning module for a composed config (task, model, attention, optim)."""
    return ByteLMData(task_config(cfg), **data_options(cfg)), ByteLMModule(cfg)
