"""Multi-query associative recall (MQAR; Arora et al. 2023, "Zoology", and the Based paper).

A sequence opens with ``num_kv_pairs`` key–value pairs, then holds queries (keys seen before) among filler
tokens; at a query the model predicts the value bound to that key, and only the query positions count in loss
and accuracy. The generator follows zoology's ``multiquery_ar`` (:func:`generate`). The splits come from
``data_seed``, not the run's ``seed``, so every seed and attention sees the same data; val and test drop the
examples whose context occurs in train. The model is the ``lm`` task's causal decoder.

Besides loss and accuracy, val and test log where the answers come from (:func:`recall_scores`):
``in_context``, the share of query predictions that are one of the sequence's values (a model guessing among
them scores ≈ 1 there and ≈ 1/num_kv_pairs in accuracy), and ``acc_pair{i}``, the accuracy of the queries
whose key is the i-th pair of the context (the last index: the most recent pair). :func:`reach_share`
counts the queries whose key a sliding window reaches.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor
from torch.utils.data import Dataset

from efficient_attn.transformer import TransformerLM, decode_state_size
from efficient_attn_tasks.config.schema import attention_spec, transformer_config
from efficient_attn_tasks.tasks import register_task
from efficient_attn_tasks.tasks.base import (
    SPLITS,
    OneLength,
    TaskData,
    TaskModule,
    check_positive,
    data_options,
    task_section,
)

IGNORE = -100  # target at non-query positions: no loss, no accuracy
ATTENTION_SITES = ("decoder",)  # the model's attention sites (check_config)
Batch = dict[str, Tensor]


@register_task("mqar")
@dataclass
class Config(OneLength):
    """The ``task:`` section for ``task=mqar`` (configs/task/mqar.yaml)."""

    name: str = "mqar"
    vocab_size: int = 8192
    seq_len: int = 64  # L, tokens per sequence
    num_kv_pairs: int = 4
    power_a: float = 0.01  # query-gap power law (zoology's default)
    random_non_queries: bool = False  # filler: random tokens (True) or token 0 (zoology's Figure 2 configs)
    train_size: int = 100_000
    val_size: int = 3_000  # picks the checkpoint and, in sweeps, the learning rate
    test_size: int = 3_000
    data_seed: int = 1234
    batch_size: int = 64
    num_workers: int = 0

    longest_from = "task.seq_len"

    def __post_init__(self) -> None:
        check_positive(self, ("vocab_size", "seq_len", "num_kv_pairs", "train_size", "val_size", "test_size",
                              "batch_size"))
        if self.seq_len % 2:
            raise ValueError(f"task.seq_len must be even (queries sit at even offsets), got {self.seq_len}")
        if 4 * self.num_kv_pairs > self.seq_len:
            raise ValueError(
                f"task.num_kv_pairs={self.num_kv_pairs} needs seq_len >= 4·num_kv_pairs = {4 * self.num_kv_pairs} "
                f"(2·kv context tokens, then kv query slots at even offsets), got seq_len={self.seq_len}"
            )
        if self.vocab_size // 2 - 1 < self.num_kv_pairs:
            raise ValueError(f"task.vocab_size={self.vocab_size} leaves fewer than num_kv_pairs distinct keys")
        if not 0.0 < self.power_a <= 1.0:
            raise ValueError(f"task.power_a must be in (0, 1], got {self.power_a}")


def task_config(cfg: DictConfig) -> Config:
    """The ``task:`` group as a checked :class:`Config` (unknown keys are a TypeError)."""
    return task_section(cfg, Config)


# ----------------------------------------------------------------------------- data


def _distinct(n: int, low: int, high: int, count: int, g: torch.Generator) -> Tensor:
    """(n, count) int64: per row, ``count`` distinct values from [low, high), uniformly."""
    return torch.rand(n, high - low, generator=g).argsort(dim=1)[:, :count] + low  # (n, count)


def generate(cfg: Config, n: int, seed: int) -> Batch:
    """``n`` MQAR sequences: tokens (n, L) and targets (n, L) (the value at queries, else -100).

    As zoology's ``multiquery_ar``: keys distinct per sequence from [1, V/2), values from [V/2, V); after the
    2·kv context tokens, query i sits at 2·gap_i, the gaps drawn without replacement from range((L − 2·kv)/2)
    with probability ∝ (gap + 1)^(a − 1) (a = ``power_a``: a → 0 favours early queries, a = 1 is uniform);
    the filler is random tokens or token 0 (``random_non_queries``).
    """
    g = torch.Generator().manual_seed(seed)
    V, L, kv = cfg.vocab_size, cfg.seq_len, cfg.num_kv_pairs
    keys = _distinct(n, 1, V // 2, kv, g)  # (n, kv)
    values = _distinct(n, V // 2, V, kv, g)  # (n, kv)
    context = torch.stack([keys, values], dim=2).reshape(n, 2 * kv)  # (n, 2kv): k0 v0 k1 v1 ...
    space = (L - 2 * kv) // 2  # query slots after the context
    slot = torch.arange(1, space + 1, dtype=torch.float64)
    weights = cfg.power_a * slot ** (cfg.power_a - 1)  # (space,)
    gaps = torch.multinomial(weights.expand(n, space), kv, replacement=False, generator=g)  # (n, kv)
    filler = torch.randint(V, (n, L), generator=g)  # drawn either way, so the flag changes nothing else
    tokens = filler if cfg.random_non_queries else torch.zeros_like(filler)  # (n, L)
    tokens[:, : 2 * kv] = context
    where = 2 * kv + 2 * gaps  # (n, kv) query positions
    tokens.scatter_(1, where, keys)
    targets = torch.full((n, L), IGNORE, dtype=torch.long).scatter_(1, where, values)  # (n, L)
    return {"tokens": tokens, "targets": targets}


def make_splits(cfg: Config) -> tuple[dict[str, Batch], dict[str, int]]:
    """Train / val / test from streams derived from ``data_seed``; val/test lose any example whose
    key–value context also occurs in train (returned: how many were dropped per split)."""
    sizes = {"train": cfg.train_size, "val": cfg.val_size, "test": cfg.test_size}
    splits = {name: generate(cfg, sizes[name], cfg.data_seed * 3 + i) for i, name in enumerate(SPLITS)}
    seen = {tuple(row) for row in splits["train"]["tokens"][:, : 2 * cfg.num_kv_pairs].tolist()}
    dropped = {}
    for name in ("val", "test"):
        contexts = splits[name]["tokens"][:, : 2 * cfg.num_kv_pairs].tolist()
        keep = torch.tensor([tuple(row) not in seen for row in contexts])  # (n,)
        dropped[name] = int((~keep).sum())
        splits[name] = {k: v[keep] for k, v in splits[name].items()}
    return splits, dropped


def query_pairs(tokens: Tensor, targets: Tensor, num_kv_pairs: int) -> tuple[Tensor, Tensor]:
    """(asked (n, L) bool: the query positions; pair (n, L) int64: which context pair the query's key is,
    0 = the first pair, num_kv_pairs − 1 = the most recent; −1 off queries). Found by matching the
    query token against the context's keys, so it holds whatever order the queries come in."""
    asked = targets != IGNORE  # (n, L)
    keys = tokens[:, 0 : 2 * num_kv_pairs : 2]  # (n, kv)
    match = tokens[:, :, None] == keys[:, None, :]  # (n, L, kv)
    pair = torch.where(asked & match.any(-1), match.long().argmax(-1), -1)  # (n, L)
    return asked, pair


def recall_scores(
    tokens: Tensor, targets: Tensor, predicted: Tensor, num_kv_pairs: int
) -> dict[str, tuple[Tensor, int]]:
    """Where the query answers come from: {name: (mean over its queries, number of queries)} for
    ``in_context`` (the prediction is one of the sequence's values, right or not) and ``acc_pair{i}``
    (accuracy of the queries whose key is the i-th pair in order of appearance). Empty names are left out.
    tokens, targets, predicted (n, L) int64."""
    asked, pair = query_pairs(tokens, targets, num_kv_pairs)
    values = tokens[:, 1 : 2 * num_kv_pairs : 2]  # (n, kv)
    in_context = (predicted[:, :, None] == values[:, None, :]).any(-1)  # (n, L)
    correct = predicted == targets  # (n, L)
    out = {"in_context": (in_context[asked].double().mean(), int(asked.sum()))}
    for i in range(num_kv_pairs):
        these = pair == i  # (n, L)
        if these.any():
            out[f"acc_pair{i}"] = (correct[these].double().mean(), int(these.sum()))
    return {k: v for k, v in out.items() if v[1]}


def key_distances(tokens: Tensor, targets: Tensor, num_kv_pairs: int) -> Tensor:
    """(queries,) int64: for every query, its position minus its key's position in the context (pair i's key
    sits at 2i), row by row; the distance a layer must reach back to see the key from the query."""
    asked, pair = query_pairs(tokens, targets, num_kv_pairs)
    position = torch.arange(tokens.shape[1]).expand_as(tokens)  # (n, L)
    return (position - 2 * pair)[asked]


def reach_share(cfg: Config, distance: int, split: str = "test") -> float:
    """Share of the queries of ``split`` (as :func:`make_splits` generates it) whose key lies within
    ``distance`` positions of the query. A causal sliding window of w keys reaches w − 1 back in one layer,
    n·(w − 1) through n stacked layers (:func:`window_reach`)."""
    data = make_splits(cfg)[0][split]
    return float((key_distances(data["tokens"], data["targets"], cfg.num_kv_pairs) <= distance).double().mean())


def window_reach(window: int, layers: int = 1) -> int:
    """How far back a causal sliding window of ``window`` keys (the query and window − 1 before it) reaches
    through ``layers`` stacked layers: layers·(window − 1)."""
    return layers * (window - 1)


class Sequences(Dataset):
    """Rows of a generated split."""

    def __init__(self, split: Batch) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split["tokens"])

    def __getitem__(self, i: int) -> Batch:
        return {k: v[i] for k, v in self.split.items()}


class MQARData(TaskData):
    """Generates the splits in ``setup`` (seconds; deterministic in ``data_seed``, so nothing is cached)."""

    def load_splits(self) -> dict[str, Sequences]:
        splits, self.dropped = make_splits(self.task)
        return {name: Sequences(split) for name, split in splits.items()}


# ----------------------------------------------------------------------------- model


class MQARModule(TaskModule):
    """Causal decoder over MQAR tokens; loss = cross-entropy at query positions, metric = query accuracy."""

    monitor = "val/acc"
    monitor_mode = "max"
    # weighted by queries; in_context and acc_pair{i} (one per pair, added in __init__): recall_scores
    eval_means = ("loss", "acc", "in_context")

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg)
        self.task = task_config(cfg)
        self.add_eval_means(tuple(f"acc_pair{i}" for i in range(self.task.num_kv_pairs)))
        model_cfg = transformer_config(cfg)
        if model_cfg.max_len < self.task.seq_len:
            raise ValueError(f"task.seq_len={self.task.seq_len} exceeds model.max_len={model_cfg.max_len}; "
                             "raise model.max_len")
        self.model = TransformerLM(model_cfg, self.task.vocab_size, attention=attention_spec(cfg, "decoder"))

    def forward(self, batch: Batch) -> Tensor:
        return self.model(batch["tokens"])  # (B, L, V)

    def scores(self, batch: Batch, logits: Tensor | None = None) -> tuple[Tensor, Tensor, int]:
        """(mean loss over query positions, accuracy over them, number of queries); ``logits``: the
        model's on this batch, when already computed."""
        logits = self(batch) if logits is None else logits  # (B, L, V)
        targets = batch["targets"]  # (B, L)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
        asked = targets != IGNORE  # (B, L)
        correct = (logits.argmax(-1) == targets) & asked  # (B, L)
        count = int(asked.sum())
        return loss, correct.sum() / count, count

    def batch_tokens(self, batch: Batch) -> int:
        return batch["tokens"].numel()

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        loss, acc, count = self.scores(batch)
        loss, logged = self.global_mean(loss, count)  # over the global batch's queries, on any number of processes
        size = batch["tokens"].shape[0]
        self.log("train/loss", logged, on_step=True, on_epoch=False, prog_bar=True, batch_size=size)
        self.log("train/acc", acc, on_step=True, on_epoch=False, batch_size=size)
        return loss

    def eval_step(self, batch: Batch, split: str) -> None:
        self.eval_logits(batch, self(batch), split)

    def eval_logits(self, batch: Batch, logits: Tensor, split: str) -> None:
        """Add one batch's loss, accuracy and :func:`recall_scores`, from the model's ``logits`` (B, L, V),
        to the means of ``split``."""
        loss, acc, count = self.scores(batch, logits)
        self.accumulate(split, "loss", loss, count)
        self.accumulate(split, "acc", acc, count)
        predicted = logits.argmax(-1)  # (B, L)
        for name, (mean, n) in recall_scores(batch["tokens"], batch["targets"], predicted,
                                             self.task.num_kv_pairs).items():
            self.accumulate(split, name, mean, n)

    def on_test_epoch_end(self) -> None:
        """Also record the decoding state one layer holds after a whole sequence (numbers per sequence);
        an attention that cannot decode as configured (cosFormer without max_len) records none, with a warning."""
        super().on_test_epoch_end()
        try:
            size = decode_state_size(self.model, self.task.seq_len)
        except ValueError as error:
            warnings.warn(f"test/state_size not recorded: {error}", stacklevel=2)
            return
        self.log("test/state_size", float(size))


def build(cfg: DictConfig) -> tuple[MQARData, MQARModule]:
    """The data module and the Lightning module for a composed config (task, model, attention, optim)."""
    return MQARData(task_config(cfg), **data_options(cfg)), MQARModule(cfg)
