"""Load a trained checkpoint on its own: what ``efficient-attn-eval``, ``-translate`` and ``-generate`` share.

A checkpoint holds everything it needs to run: the run's resolved config (``hyper_parameters``), the
weights, and what the task's code cannot rebuild from the config alone (translation: the SentencePiece
model's bytes; ListOps: its vocabulary, checked against the code's). Loading reads neither the data dir
nor the tokenizer cache; only scoring a split of the run's own data reads (or regenerates) that data.
A task module whose ``build`` reads data defines ``restore(cfg, checkpoint)``
(efficient_attn_tasks/tasks/translation.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from efficient_attn.registry import import_attentions
from efficient_attn_tasks.config.checks import ConfigError
from efficient_attn_tasks.config.labels import attention_label
from efficient_attn_tasks.run.record import RESULTS_JSON, RunRecord
from efficient_attn_tasks.tasks import task_module


@dataclass
class Loaded:
    """A checkpoint ready to run: the file and why it was chosen, the run's config, the task's data
    module (not set up: nothing read yet) and its Lightning module (weights loaded, eval mode, CPU)."""

    path: Path
    chosen: str
    cfg: DictConfig
    data: Any
    module: Any
    swap: dict[str, Any] | None = None  # with ``attention``: what was swapped in, and how the weights loaded


def find(path: Path) -> tuple[Path, str]:
    """(checkpoint file, how it was chosen) for a .ckpt file or a run dir. A run dir means its best
    checkpoint: results.json's ``metrics.best_checkpoint`` looked up by name in the run dir's
    checkpoints/ (so a moved run dir still works), else the run's only ``checkpoints/best-*.ckpt``."""
    if path.is_file():
        return path, "the file given"
    if not path.is_dir():
        raise ConfigError(f"{path} is neither a checkpoint file nor a run dir; give a .ckpt file or a run dir")
    results = path / RESULTS_JSON
    metrics = RunRecord.read(results).metrics if results.is_file() else None
    best = metrics.best_checkpoint if metrics is not None else None
    if best and (path / "checkpoints" / Path(best).name).is_file():
        return (path / "checkpoints" / Path(best).name,
                f"the best checkpoint of run {path} by {metrics.monitor} (results.json)")
    found = sorted((path / "checkpoints").glob("best-*.ckpt"))
    if len(found) == 1:
        return found[0], f"the only best-*.ckpt of run {path}"
    if found:
        raise ConfigError(f"run {path} has {len(found)} best-*.ckpt files ({', '.join(p.name for p in found)}) "
                          "and no results.json naming one; give the .ckpt file")
    raise ConfigError(f"run {path} has no checkpoints/best-*.ckpt; give a .ckpt file (e.g. its checkpoints/last.ckpt)")


def read(file: Path) -> tuple[dict[str, Any], DictConfig]:
    """(the checkpoint, its run's config) of a checkpoint file of efficient-attn-train, else a ConfigError."""
    try:  # a checkpoint holds tensors and plain data only: nothing in it may run code
        checkpoint = torch.load(file, map_location="cpu", weights_only=True)
        return checkpoint, OmegaConf.create(checkpoint["hyper_parameters"]["config"])
    except Exception as err:  # truncated, foreign, or not saved by efficient-attn-train
        raise ConfigError(f"cannot load {file} as a checkpoint of efficient-attn-train: "
                          f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None


def load(path: Path, task_overrides: dict[str, Any] | None = None, data_dir: str | None = None,
         cache_dir: str | None = None, attention: str | None = None,
         attention_kwargs: dict[str, Any] | None = None) -> Loaded:
    """The checkpoint at ``path`` (a file or a run dir, see :func:`find`) rebuilt from its own config.

    ``task_overrides`` set ``task.<key>`` before the modules are built (batch size, beam size; a key the
    task has not is an error); ``data_dir`` / ``cache_dir`` replace the run's, when given. ``attention``:
    the model is rebuilt with attention config ``attention`` (its kwargs updated by ``attention_kwargs``) at
    every site, from the run's seed, and loaded by :func:`efficient_attn_tasks.run.convert.load_converted`.
    """
    file, chosen = find(Path(path))
    checkpoint, cfg = read(file)
    for key, value in (task_overrides or {}).items():
        if value is None:
            continue
        if key not in cfg.task:
            raise ConfigError(f"task.{key} is not an option of a {cfg.task.name} checkpoint (its task has no such key)")
        cfg.task[key] = value
    for key, value in (("data_dir", data_dir), ("cache_dir", cache_dir)):
        if value is not None:
            cfg[key] = str(value)
    import_attentions(cfg.get("imports") or [])  # the run's own attentions (its config's imports)
    try:
        task = task_module(cfg.task.name)  # a task from elsewhere registered itself when its imports loaded
    except ValueError as err:
        raise ConfigError(f"{file}: {err}") from None
    check_vocabulary(file, checkpoint, cfg.task.name, task)
    old, swap = cfg, None
    if attention is not None:
        from efficient_attn_tasks.run import convert

        cfg = convert.swap_attention(old, attention, attention_kwargs or {}, task.ATTENTION_SITES)
        torch.manual_seed(int(cfg.seed))  # the new attention's own tensors: drawn as training would draw them
    try:
        data, module = task.restore(cfg, checkpoint) if hasattr(task, "restore") else task.build(cfg)
    except ValueError as err:
        raise ConfigError(f"task.{cfg.task.name}: {err}") from None
    if attention is None:
        module.load_state_dict(checkpoint["state_dict"])
    else:
        same = convert.same_attentions(old, cfg, task.ATTENTION_SITES)
        done = convert.load_converted(module, checkpoint["state_dict"], same)
        swap = {"attention_config": attention, "attention": OmegaConf.to_container(cfg.attention, resolve=True),
                "checkpoint_attention": attention_label(old), "same_attention": same, **done.to_dict()}
    return Loaded(file, chosen, cfg, data, module.eval(), swap)


def check_vocabulary(file: Path, checkpoint: dict[str, Any], task_name: str, task: Any) -> None:
    """A checkpoint that saved its task's token vocabulary (ListOps) was trained with this code's."""
    saved = checkpoint.get("vocabulary")
    if saved is not None and list(saved) != list(task.VOCAB):
        raise ConfigError(f"{file} was trained with the {task_name} vocabulary {list(saved)}, but this code's is "
                          f"{list(task.VOCAB)}; use the code version that trained it")


def device(name: str) -> torch.device:
    """``--device``: auto (CUDA when there is one, else the CPU), cpu or cuda."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: torch sees no CUDA device here; use --device cpu")
    return torch.device(name)


def check_lengths(seqs: Sequence[Sequence[int]], limit: int, where: str, first_line: int = 1) -> None:
    """Every sequence has at most ``limit`` tokens, else one error naming the first line that has more."""
    for i, seq in enumerate(seqs):
        if len(seq) > limit:
            raise ConfigError(f"{where} line {first_line + i} has {len(seq)} tokens, more than the {limit} this "
                              "model takes (model.max_len); shorten or split that line")


VOCABULARY_KEYS = ("vocab_size", "tokenizer")  # task keys that fix the tokens the embeddings stand for


@dataclass
class Source:
    """The checkpoint a run starts from (``init_from``): its file, why that file, the checkpoint, its run's config."""

    path: Path
    chosen: str
    checkpoint: dict[str, Any]
    cfg: DictConfig


def read_source(cfg: DictConfig, task: Any) -> Source:
    """The checkpoint ``cfg.init_from`` names (a .ckpt, or a run dir: its best checkpoint), read before anything
    of the run is built; it must be of ``cfg``'s task. ``cfg.init_from`` becomes the file's absolute path, so the
    run's config (and results.json) says which checkpoint it started from."""
    file, chosen = find(Path(cfg.init_from))
    checkpoint, old = read(file)
    name, new = old.task.get("name"), cfg.task.get("name")
    if name != new:
        raise ConfigError(f"init_from={file} is a checkpoint of task {name}, but this run's task is {new}; "
                          f"give a {new} checkpoint, or set task={name}")
    check_vocabulary(file, checkpoint, new, task)
    for key in VOCABULARY_KEYS:  # translation trains with the checkpoint's tokenizer (fit.py: the task's restore)
        if key in old.task and key in cfg.task and old.task[key] != cfg.task[key]:
            raise ConfigError(f"init_from={file} was trained with task.{key}={old.task[key]}, this run has "
                              f"task.{key}={cfg.task[key]}; the embeddings belong to the checkpoint's vocabulary: "
                              f"set task.{key}={old.task[key]}")
    cfg.init_from = str(file.resolve())
    return Source(file, chosen, checkpoint, old)
