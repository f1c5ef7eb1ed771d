"""ListOps (Nangia & Bowman 2018) as in Long Range Arena (Tay et al. 2021): classify the value of a nested list
expression, e.g. ``[MAX 2 9 [MIN 4 7 ] 0 ]`` -> 9: operators MIN, MAX, MED and SM (sum modulo 10) over the
digits 0-9, 10 classes.

The generator follows LRA's ``generate_tree`` (:func:`generate_listops`), rejection-sampling expressions until
their length in tokens lies strictly between ``min_length`` and ``max_length``; brackets are tokens. The splits
are generated once, deduplicated as LRA's, and cached.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from efficient_attn.transformer import TransformerClassifier
from efficient_attn_tasks.config.schema import attention_spec, transformer_config
from efficient_attn_tasks.tasks import register_task
from efficient_attn_tasks.tasks.base import TaskData, TaskModule, check_positive, data_options, task_section
from efficient_attn_tasks.tasks.data import DataError

ATTENTION_SITES = ("encoder",)  # the model's attention sites (check_config)
MIN_ARGS = 2  # arguments per operator: MIN_ARGS..max_args, as LRA's generator (randint(2, max_args))

OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
END = "]"
DIGITS = tuple(str(d) for d in range(10))
VOCAB = ("<pad>", "<cls>", *OPERATORS, END, *DIGITS)
TOKEN_ID = {token: i for i, token in enumerate(VOCAB)}
PAD_ID, CLS_ID = TOKEN_ID["<pad>"], TOKEN_ID["<cls>"]
VOCAB_SIZE, NUM_CLASSES = len(VOCAB), 10
OPERATOR_P = 0.25  # LRA's VALUE_P: a non-root node below max_depth is an operator with this probability
CACHE_VERSION = 2  # bump when the generator or the file layout changes
SPLIT_OFFSET = {"train": 0, "val": 1, "test": 2}


@register_task("listops")
@dataclass
class Config:
    """The ``task:`` section for ``task=listops`` (configs/task/listops.yaml)."""

    name: str = "listops"
    train_size: int = 96000
    val_size: int = 2000
    test_size: int = 2000
    min_length: int = 500  # tokens, exclusive
    max_length: int = 2000  # tokens, exclusive
    max_depth: int = 10
    max_args: int = 10
    data_seed: int = 1234
    batch_size: int = 32
    pooling: str = "mean"  # mean | cls (prepends <cls>)
    num_workers: int = 0

    longest_from = "task.max_length - 1, +1 with task.pooling=cls"  # what longest_sequence follows (errors)

    def __post_init__(self) -> None:
        check_positive(self, ("train_size", "val_size", "test_size", "batch_size"))
        if self.pooling not in ("mean", "cls"):
            raise ValueError(f"task.pooling must be 'mean' or 'cls', got {self.pooling!r}")
        if self.num_workers < 0:
            raise ValueError(f"task.num_workers must be >= 0, got {self.num_workers}")
        check_params(self.min_length, self.max_length, self.max_depth, self.max_args)

    @property
    def longest_sequence(self) -> int:
        """Most tokens the model sees in one sequence, <cls> included (the default model.max_len)."""
        return self.max_length - 1 + (self.pooling == "cls")


def task_config(cfg: DictConfig) -> Config:
    """The ``task:`` group as a checked :class:`Config` (unknown keys are a TypeError, bad values a ValueError)."""
    return task_section(cfg, Config)


def longest_expression(max_depth: int, max_args: int) -> int:
    """Tokens in the largest expression: a full max_args-ary tree, operators at depths 1..max_depth-1."""
    operators = sum(max_args**d for d in range(max_depth - 1))
    return 2 * operators + max_args ** (max_depth - 1)


def check_params(min_length: int, max_length: int, max_depth: int, max_args: int) -> None:
    """ValueError saying what to change if no expression can satisfy the parameters."""
    if max_depth < 2:
        raise ValueError(f"max_depth={max_depth} leaves no room for an operator; use max_depth >= 2")
    if max_args < MIN_ARGS:
        raise ValueError(f"max_args={max_args} must be >= {MIN_ARGS}")
    if min_length >= max_length - 1:
        raise ValueError(
            f"min_length={min_length} and max_length={max_length}: lengths are strictly between them, "
            "so max_length must exceed min_length + 1"
        )
    shortest = MIN_ARGS + 2  # e.g. [MAX 1 2 ]
    if max_length <= shortest:
        raise ValueError(f"max_length={max_length}: the shortest expression has {shortest} tokens; raise max_length")
    longest = longest_expression(max_depth, max_args)
    if longest <= min_length:
        raise ValueError(
            f"min_length={min_length}: the longest expression with max_depth={max_depth} and "
            f"max_args={max_args} has {longest} tokens; lower min_length or raise max_depth / max_args"
        )


def apply(op: str, args: Sequence[int]) -> int:
    """Value of one operator. MED of an even count is the floor of the mean of the two middle
    values, i.e. LRA's ``int(np.median(args))``."""
    if op == "[MIN":
        return min(args)
    if op == "[MAX":
        return max(args)
    if op == "[SM":
        return sum(args) % 10
    if op == "[MED":
        s, n = sorted(args), len(args)
        return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) // 2
    raise ValueError(f"unknown operator {op!r}; known: {OPERATORS}")


def evaluate(tokens: Sequence[str]) -> int:
    """Value of one tokenized expression; ValueError if it is malformed."""
    stack: list[tuple[str, list[int]]] = []
    result: int | None = None
    for token in tokens:
        if token in OPERATORS:
            stack.append((token, []))
            continue
        if token == END:
            if not stack or not stack[-1][1]:
                raise ValueError(f"unbalanced or empty operator at {token!r} in {' '.join(tokens)!r}")
            op, args = stack.pop()
            value = apply(op, args)
        elif token in DIGITS:
            value = int(token)
        else:
            raise ValueError(f"unknown token {token!r}; known: {VOCAB[2:]}")
        if stack:
            stack[-1][1].append(value)
        elif result is None:
            result = value
        else:
            raise ValueError(f"more than one top-level expression in {' '.join(tokens)!r}")
    if stack or result is None:
        raise ValueError(f"incomplete expression {' '.join(tokens)!r}")
    return result


class _TooLong(Exception):
    """Raised to abandon a tree as soon as it cannot end shorter than max_length."""


def _sample(rng: random.Random, depth: int, max_depth: int, max_args: int, out: list[str], limit: int) -> int:
    """Append one random node (root at depth 1) to ``out`` and return its value."""
    if depth > 1 and (depth >= max_depth or rng.random() >= OPERATOR_P):
        value = rng.randrange(10)
        out.append(DIGITS[value])
        if len(out) + depth - 1 >= limit:  # depth - 1 operators are still open
            raise _TooLong
        return value
    op = rng.choice(OPERATORS)
    out.append(op)
    args = [_sample(rng, depth + 1, max_depth, max_args, out, limit) for _ in range(rng.randint(MIN_ARGS, max_args))]
    out.append(END)
    return apply(op, args)


def generate_listops(
    n: int,
    *,
    seed: int,
    min_length: int,
    max_length: int,
    max_depth: int = 10,
    max_args: int = 10,
    seen: set[bytes] | None = None,
) -> list[tuple[list[str], int]]:
    """``n`` distinct (tokens, value) pairs with min_length < len(tokens) < max_length.

    The root has depth 1, so operators nest at most ``max_depth - 1`` deep. ``seen`` holds digests of
    expressions to skip (e.g. other splits'); accepted ones are added.
    """
    check_params(min_length, max_length, max_depth, max_args)
    rng, seen = random.Random(seed), set() if seen is None else seen
    samples: list[tuple[list[str], int]] = []
    max_attempts = 1000 * max(n, 1)
    progress = tqdm(total=n, desc="generating ListOps", unit="seq", disable=n < 5000, leave=False)
    for _ in range(max_attempts):
        if len(samples) == n:
            progress.close()
            return samples
        tokens: list[str] = []
        try:
            value = _sample(rng, 1, max_depth, max_args, tokens, max_length)
        except _TooLong:
            continue
        digest = hashlib.blake2b(" ".join(tokens).encode(), digest_size=16).digest()
        if len(tokens) > min_length and digest not in seen:
            seen.add(digest)
            samples.append((tokens, value))
            progress.update()
    progress.close()
    if len(samples) == n:
        return samples
    raise ValueError(
        f"found only {len(samples)} of {n} distinct expressions in {max_attempts} attempts with "
        f"min_length={min_length}, max_length={max_length}, max_depth={max_depth}, max_args={max_args}; "
        "widen the length range, adjust max_depth / max_args, or ask for fewer samples"
    )


def _generate_splits(task: Config) -> dict[str, dict[str, Any]]:
    """val, then test, then train, each from its own seed; later splits skip earlier splits' expressions."""
    seen: set[bytes] = set()
    splits = {}
    for split in ("val", "test", "train"):
        samples = generate_listops(
            getattr(task, f"{split}_size"), seed=3 * task.data_seed + SPLIT_OFFSET[split], seen=seen,
            min_length=task.min_length, max_length=task.max_length, max_depth=task.max_depth, max_args=task.max_args,
        )
        ids = [TOKEN_ID[t] for tokens, _ in samples for t in tokens]
        splits[split] = {
            "tokens": torch.tensor(ids, dtype=torch.int8),  # (sum of lengths,) concatenated
            "lengths": torch.tensor([len(tokens) for tokens, _ in samples], dtype=torch.int64),
            "labels": torch.tensor([value for _, value in samples], dtype=torch.int64),
        }
    return splits


class ListOpsDataset(Dataset):
    """One split: token ids (with <cls> first if asked) and labels."""

    def __init__(self, split: dict[str, Tensor], cls: bool = False) -> None:
        self.tokens, self.labels, self.cls = split["tokens"], split["labels"], cls
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.int64), split["lengths"].cumsum(0)])  # (N + 1,)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        ids = self.tokens[self.offsets[i] : self.offsets[i + 1]].long()  # (L,)
        if self.cls:
            ids = torch.cat([torch.tensor([CLS_ID]), ids])  # (L + 1,)
        return ids, int(self.labels[i])


def collate(items: list[tuple[Tensor, int]]) -> dict[str, Tensor]:
    """Pad to the longest sequence in the batch; padding_mask is True at padding."""
    lengths = torch.tensor([len(ids) for ids, _ in items])  # (B,)
    tokens = pad_sequence([ids for ids, _ in items], batch_first=True, padding_value=PAD_ID)  # (B, T)
    padding_mask = torch.arange(tokens.shape[1])[None, :] >= lengths[:, None]  # (B, T)
    return {"tokens": tokens, "padding_mask": padding_mask, "label": torch.tensor([y for _, y in items])}


class ListOpsData(TaskData):
    """Generates the splits once into the cache (``prepare_data``) and loads them (``setup``)."""

    collate_fn = staticmethod(collate)

    @property
    def params(self) -> dict[str, Any]:
        """What the cached splits depend on (the generator's version and parameters)."""
        unused = ("name", "batch_size", "pooling", "num_workers")
        return {"version": CACHE_VERSION, **{k: v for k, v in asdict(self.task).items() if k not in unused}}

    @property
    def path(self) -> Path:
        """The cache file of these splits (named by their parameters)."""
        digest = hashlib.sha256(json.dumps(self.params, sort_keys=True).encode()).hexdigest()[:16]
        return self.cache_root / "listops" / f"{digest}.pt"

    def prepare_data(self) -> None:
        if self.path.exists():
            return
        try:
            data = {"params": self.params, "splits": _generate_splits(self.task)}
        except ValueError as err:  # lengths, depth or argument counts the generator cannot satisfy
            raise DataError(f"ListOps generator: {err} (task.min_length/max_length/max_depth/max_args)") from None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=self.path.parent, suffix=".tmp", delete=False) as tmp:
            torch.save(data, tmp)
        os.replace(tmp.name, self.path)

    def load_splits(self) -> dict[str, ListOpsDataset]:
        path, params = self.path, self.params
        if not path.exists():
            self.prepare_data()
        try:
            data = torch.load(path, weights_only=True)
        except Exception as err:  # truncated or foreign file
            raise DataError(f"cannot read cached ListOps data {path}: {err}; delete it to regenerate") from None
        if data.get("params") != params:
            raise DataError(f"{path} was generated with {data.get('params')}, not {params}; delete it")
        cls = self.task.pooling == "cls"
        return {name: ListOpsDataset(split, cls) for name, split in data["splits"].items()}


class ListOpsModule(TaskModule):
    """Encoder classifier trained with cross-entropy; accuracy is the selection metric."""

    monitor = "val/acc"
    monitor_mode = "max"
    eval_means = ("loss", "acc")  # loss weighted by examples; acc: the mean of correct (1) and wrong (0) predictions

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg)
        self.task = task_config(cfg)
        self.model = TransformerClassifier(
            transformer_config(cfg), VOCAB_SIZE, NUM_CLASSES,
            attention=attention_spec(cfg, "encoder"), pooling=self.task.pooling,
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Also the token vocabulary: a checkpoint loaded by code with another one is refused
        (efficient_attn_tasks/inference/checkpoint.py)."""
        super().on_save_checkpoint(checkpoint)
        checkpoint["vocabulary"] = list(VOCAB)

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        return self.model(batch["tokens"], batch["padding_mask"])  # (B, 10)

    def batch_tokens(self, batch: dict[str, Tensor]) -> int:
        return int((~batch["padding_mask"]).sum())

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        # over the global batch's examples: processes hold unequal shares when task.batch_size % processes != 0
        loss, logged = self.global_mean(F.cross_entropy(self(batch), batch["label"]), len(batch["label"]))
        self.log("train/loss", logged, on_step=True, on_epoch=False, batch_size=len(batch["label"]))
        return loss

    def eval_step(self, batch: dict[str, Tensor], split: str) -> None:
        logits, labels = self(batch), batch["label"]  # (B, 10), (B,)
        self.accumulate(split, "loss", F.cross_entropy(logits, labels), len(labels))
        self.accumulate(split, "acc", (logits.argmax(-1) == labels).float())  # micro accuracy, as MulticlassAccuracy


def build(cfg: DictConfig) -> tuple[ListOpsData, ListOpsModule]:
    """Data module and Lightning module for the composed run config."""
    task = task_config(cfg)
    if cfg.model.max_len < task.longest_sequence:
        raise ValueError(
            f"ListOps sequences reach {task.longest_sequence} tokens (task.max_length={task.max_length}, "
            f"pooling={task.pooling}) but model.max_len={cfg.model.max_len}; raise model.max_len"
        )
    return ListOpsData(task, **data_options(cfg)), ListOpsModule(cfg)
