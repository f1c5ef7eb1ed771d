"""A run's record, ``results.json``: :class:`RunRecord`, the one typed form every writer and reader of that file
goes through (the trainer writes it; the report, the sweep summary, checkpoint lookup and resuming read it);
what a finished run measured (:func:`run_record`) or who a failed or interrupted run was and why it stopped
(:func:`failed_record`); which checkpoint the test split used and the run's one-line summary. The memory, hardware
and version facts every record carries are efficient_attn_tasks/run/machine.py.

Importing this module loads neither torch nor Lightning; the helpers that read torch import it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from efficient_attn_tasks.run.machine import hardware, peak_memory_mib, versions

RECORD_VERSION = 3  # the format RunRecord.to_json writes; a record without "version" is format 1
# Format 3 adds stopped_step, best_step, converged and feature_redraws (null in older records: not recorded)
RESULTS_JSON = "results.json"  # a run dir's record


@dataclasses.dataclass
class RunError:
    """Why a failed or interrupted run stopped: the exception's type name and its one-line message."""

    type: str = "error"
    message: str = ""
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # keys this code does not know


@dataclasses.dataclass
class Metrics:
    """A finished run's metrics: the monitored validation metric and its best value (which chose the best
    checkpoint), the last validation metrics, the test metrics, and the checkpoints behind them."""

    monitor: str | None = None  # the task's validation metric, e.g. "val/acc"
    val_best: float | None = None
    val_last: dict[str, float] = dataclasses.field(default_factory=dict)
    test: dict[str, float] = dataclasses.field(default_factory=dict)  # {} when the run was not tested
    best_checkpoint: str | None = None  # None when validation never ran
    test_checkpoint: dict[str, Any] | None = None  # tested_checkpoint(); None in format 1 records
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # keys this code does not know

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Metrics:
        known, extra = _split(cls, raw)
        known["val_last"] = known.get("val_last") or {}
        known["test"] = known.get("test") or {}
        return cls(**known, extra=extra)


@dataclasses.dataclass
class RunRecord:
    """One run's ``results.json``: a finished run (``status`` "ok": metrics, sizes, speed, memory, times), a
    failed one (``status`` "failed": ``error``, the step reached, no metrics) or an interrupted one (``status``
    "interrupted": Ctrl-C or SIGTERM, as a failed one; its ``last.ckpt`` holds the step reached).

    :meth:`to_json` writes ``version`` (:data:`RECORD_VERSION`), then the keys of the record's status in order
    (``OK_KEYS``, ``FAILED_KEYS``; null when unset), then any other field that is set. :meth:`from_json` reads
    every format (no ``version``: format 1) and is the one place that fills a key a record lacks; keys this code
    does not know (a newer or hand-edited record) are kept in ``extra`` and written back, never dropped.
    """

    name: str | None = None
    task: str | None = None
    attention: str | None = None  # attention.name, or the model.layer_attentions joined by "+"
    attention_config: str | None = None  # the attention config file (favor_relu where attention is favor)
    seed: int | None = None
    status: str = "ok"  # or "failed", "interrupted" (STOPPED)
    config: dict[str, Any] = dataclasses.field(default_factory=dict)  # resolved (as written when it cannot resolve)
    overrides: list[str] = dataclasses.field(default_factory=list)  # the Hydra job's; [] in format 1 records
    metrics: Metrics | None = None  # finished runs only
    error: RunError | None = None  # failed runs only
    bleu_signature: str | None = None
    num_parameters: int | None = None
    epochs: int | None = None  # completed epochs
    steps: int | None = None  # optimizer steps (a failed run: the step it reached)
    stopped_step: int | None = None  # the optimizer step training stopped at (its cap, or early stopping)
    best_step: int | None = None  # the optimizer step of the best validation checkpoint; None without validation
    converged: bool | None = None  # training_verdict(): True early stopping fired, False still improving, None unknown
    feature_redraws: int | None = None  # FAVOR+ feature redraws during training; None: the model has no such features
    processes: int | None = None  # DDP: devices × nodes
    train_tokens: int | None = None  # of all processes
    train_tokens_per_s: float | None = None  # global: all processes' tokens / training seconds
    train_tokens_per_s_scope: str | None = None
    peak_memory_mib: float | None = None
    fit_time_s: float | None = None
    wall_time_s: float | None = None
    hardware: str | None = None
    versions: dict[str, str] = dataclasses.field(default_factory=dict)
    skipped_updates: int | None = None  # updates the non-finite guard skipped
    scaler_skipped_steps: int | None = None  # fp16 AMP overflow steps the scaler skipped (normal)
    precision: str | None = None  # as Lightning ran it (16-mixed on CPU becomes bf16-mixed)
    resumed_from: str | None = None  # the checkpoint this attempt resumed from
    threads: int | None = None  # torch threads
    transfer: dict[str, Any] | None = None  # stage one of a conversion (transfer_steps): steps run, losses
    version: int = RECORD_VERSION  # the format this record was read in
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # keys this code does not know

    OK_KEYS = ("name", "task", "attention", "attention_config", "seed", "status", "config", "overrides", "metrics",
               "bleu_signature", "num_parameters", "epochs", "steps", "stopped_step", "best_step", "converged",
               "feature_redraws", "processes", "train_tokens",
               "train_tokens_per_s", "train_tokens_per_s_scope", "peak_memory_mib", "fit_time_s", "wall_time_s",
               "hardware", "versions", "skipped_updates", "scaler_skipped_steps", "precision", "resumed_from",
               "threads")
    STOPPED = ("failed", "interrupted")  # unfinished: no metrics; ckpt_path=last runs them again
    FAILED_KEYS = ("name", "task", "attention", "seed", "status", "error", "config", "overrides", "steps",
                   "resumed_from", "wall_time_s", "versions")

    @property
    def failed(self) -> bool:
        return self.status == "failed"

    @property
    def stopped(self) -> bool:
        """Failed or interrupted: the run did not finish, has no metrics, and ``ckpt_path=last`` continues it."""
        return self.status in self.STOPPED

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of the current format: ``version``, the status's keys, other set fields, ``extra``."""
        keys = self.FAILED_KEYS if self.stopped else self.OK_KEYS
        fields = [f.name for f in dataclasses.fields(self) if f.name not in ("version", "extra")]
        keys = [*keys, *(k for k in fields if k not in keys and getattr(self, k) is not None)]
        out: dict[str, Any] = {"version": RECORD_VERSION}
        for key in keys:
            value = getattr(self, key)
            out[key] = _with_extra(value) if isinstance(value, (Metrics, RunError)) else value
        return {**out, **{k: v for k, v in self.extra.items() if k not in out}}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_json(cls, data: str | bytes | dict[str, Any]) -> RunRecord:
        """A record from its JSON text or parsed object, of any format (see the class docstring); ValueError
        when the JSON is not an object."""
        raw = json.loads(data) if isinstance(data, (str, bytes)) else data
        if not isinstance(raw, dict):
            raise ValueError(f"a run record is a JSON object, not {type(raw).__name__}")
        known, extra = _split(cls, {k: v for k, v in raw.items() if k != "version"})
        known["status"] = known.get("status") or "ok"  # a record without one is a finished run
        known["config"] = known.get("config") or {}
        known["overrides"] = known.get("overrides") or []
        known["versions"] = known.get("versions") or {}
        if known.get("seed") is None:
            known["seed"] = known["config"].get("seed")
        if isinstance(known.get("metrics"), dict):
            known["metrics"] = Metrics.from_dict(known["metrics"])
        if known["status"] in cls.STOPPED or isinstance(known.get("error"), dict):
            error, error_extra = _split(RunError, known.get("error") or {})
            known["error"] = RunError(**error, extra=error_extra)
        if known["status"] in cls.STOPPED:
            known["steps"] = known.get("steps") or 0  # stopped before training
        version = raw.get("version", 1)
        return cls(**known, version=version if isinstance(version, int) else 1, extra=extra)

    @classmethod
    def read(cls, path: Path | str) -> RunRecord:
        """The record in ``path`` (a results.json); OSError when it cannot be read, ValueError when it is not
        a JSON object (e.g. cut short by a killed run)."""
        return cls.from_json(Path(path).read_text())

    def write(self, path: Path | str) -> None:
        Path(path).write_text(self.to_json())


def _with_extra(part: Metrics | RunError) -> dict[str, Any]:
    """A record part as its JSON object: its fields, then the keys in its ``extra``."""
    known = {f.name: getattr(part, f.name) for f in dataclasses.fields(part) if f.name != "extra"}
    return {**known, **{k: v for k, v in part.extra.items() if k not in known}}


def _split(cls: type, raw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the keys of ``raw`` that are fields of the dataclass ``cls``, the others)."""
    names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
    return {k: v for k, v in raw.items() if k in names}, {k: v for k, v in raw.items() if k not in names}


@dataclasses.dataclass
class Attempt:
    """A run in progress, as its failed record needs it: when it started, where it resumed from, its Trainer
    once built (the step it reached), the wall seconds of the earlier attempts its checkpoint carries."""

    start: float
    resumed_from: str | None = None
    trainer: Any = None
    before: float = 0.0  # set by WallClock when the attempt resumes from a checkpoint

    @property
    def step(self) -> int:
        return int(self.trainer.global_step) if self.trainer is not None else 0

    @property
    def wall_s(self) -> float:
        """Wall seconds of the run so far: the earlier attempts up to the checkpoint resumed from, and this one."""
        return self.before + time.perf_counter() - self.start


def tested_checkpoint(best_path: str, last_step: int, announce: bool = True) -> dict[str, Any]:
    """Which weights the test split is evaluated with: ``{"checkpoint": "best", "path", "step"}``, the
    best checkpoint by the task's validation metric; or, when there is none (validation never ran:
    ``trainer.limit_val_batches=0``, a run shorter than its validation interval, ``fast_dev_run``),
    ``{"checkpoint": "last", "path": None, "step": last_step}``, the weights at the end of training,
    said in a warning line (``announce``: this process prints) so a test metric never hides its source.
    """
    if best_path:
        return {"checkpoint": "best", "path": best_path, "step": checkpoint_step(best_path)}
    if announce:
        print(f"warning: no best checkpoint (validation never ran); testing the last weights, step {last_step}; "
              "results.json says test_checkpoint: last", file=sys.stderr)
    return {"checkpoint": "last", "path": None, "step": last_step}


def checkpoint_step(path: str) -> int:
    """The optimizer step at which a Lightning checkpoint is saved (its ``global_step``)."""
    import torch

    return int(torch.load(path, map_location="cpu", weights_only=False, mmap=True)["global_step"])


def training_verdict(early_stopping: bool, early_stopped: bool, best_step: int | None,
                     last_val_step: int | None) -> bool | None:
    """``converged`` of a run record, from how training ended:

    - True: early stopping fired because the monitored metric stopped improving (its patience ran out, or it
      reached ``stopping_threshold``);
    - else None when validation never ran (no best step);
    - else False with early stopping on (the run reached its step cap, or early stopping fired on divergence
      or a non-finite metric): an improvement larger than ``min_delta`` came within its last ``patience``
      validations: still improving;
    - else (early stopping off) False when the best validation is the last one (``best_step ==
      last_val_step``: still improving at the cap), None otherwise (an earlier best may be a plateau or
      noise; without a patience rule that cannot be told).
    """
    if early_stopped:
        return True
    if best_step is None:
        return None
    if early_stopping:
        return False
    return False if best_step == last_val_step else None


def feature_redraws(model: Any) -> int | None:
    """Redraws of random features during training: the most of any module with a ``feature_redraws`` count
    (FAVOR+; every module of one config shares its schedule); None when the model has no such module."""
    counts = [int(m.feature_redraws) for m in model.modules() if hasattr(m, "feature_redraws")]
    return max(counts) if counts else None


def run_record(cfg, module, trainer, checkpoint, throughput, val, test, fit_s, wall_s) -> RunRecord:
    """The record of a finished run (``"status": "ok"``): who it was, its config and overrides, its validation
    and test metrics, size, steps, throughput, peak memory, times, hardware and versions; ``run`` adds the
    tested checkpoint, skipped updates, precision, resume point and threads."""
    from efficient_attn_tasks.config.labels import attention_config, attention_label

    best = checkpoint.best_model_score
    return RunRecord(
        name=cfg.name,
        task=cfg.task.name,
        attention=attention_label(cfg),
        attention_config=attention_config(cfg),
        seed=cfg.seed,
        status="ok",
        config=OmegaConf.to_container(cfg, resolve=True),
        overrides=job_overrides(),
        metrics=Metrics(
            monitor=module.monitor,
            val_best=float(best) if best is not None else val.get(module.monitor),
            val_last=val,
            test={k: float(v) for k, v in test.items()},
            best_checkpoint=checkpoint.best_model_path or None,
        ),
        bleu_signature=getattr(module, "bleu_signature", None),
        num_parameters=module.num_parameters(),
        epochs=trainer.fit_loop.epoch_progress.current.completed,
        steps=trainer.global_step,
        processes=trainer.world_size,
        train_tokens=throughput.tokens,
        train_tokens_per_s=throughput.tokens_per_s,
        train_tokens_per_s_scope="global (sum over processes)",
        peak_memory_mib=peak_memory_mib(),
        fit_time_s=fit_s,
        wall_time_s=wall_s,
        hardware=hardware(),
        versions=versions(),
    )


MESSAGE_CHARS = 1000  # a failed record's error message is cut here (an error can print a whole tensor)


def failed_record(cfg: DictConfig, err: BaseException, attempt: Attempt, status: str = "failed") -> RunRecord:
    """The record of a run that raised ``err``: who it was (name, task, attention, seed, config, overrides, as
    a finished run's record), ``status`` ("failed", or "interrupted" for Ctrl-C or SIGTERM), the error's type
    and one-line message, the step it reached (0 before training), its wall time. No metrics: readers never
    average a stopped run into a table."""
    from efficient_attn_tasks.config.labels import attention_label

    try:
        attention = attention_label(cfg)
    except Exception:  # noqa: BLE001 - a config too broken to label: the attention config's own name
        attention = str(OmegaConf.select(cfg, "attention.name", default=None))
    try:
        config = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException:  # an interpolation that cannot resolve: record it as written
        config = OmegaConf.to_container(cfg, resolve=False)
    message = " ".join(str(err).split()) or repr(err)
    return RunRecord(
        name=OmegaConf.select(cfg, "name", default=None),
        task=OmegaConf.select(cfg, "task.name", default=None),
        attention=attention,
        seed=OmegaConf.select(cfg, "seed", default=None),
        status=status,
        error=RunError(type(err).__name__, message[:MESSAGE_CHARS]),
        config=config,
        overrides=job_overrides(),
        steps=attempt.step,
        resumed_from=str(attempt.resumed_from) if attempt.resumed_from else None,
        wall_time_s=attempt.wall_s,
        versions=versions(),
    )


def write_failed_record(cfg: DictConfig, out_dir: Path, err: BaseException, attempt: Attempt,
                        status: str = "failed") -> None:
    """Write :func:`failed_record` to ``out_dir/results.json`` (rank zero only), unless that file is a finished
    run's record (ok): a later attempt's error or interrupt does not erase a result."""
    if not rank_zero(attempt.trainer) or record_status(out_dir / RESULTS_JSON) == "ok":
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    failed_record(cfg, err, attempt, status).write(out_dir / RESULTS_JSON)


def rank_zero(trainer: Any = None) -> bool:
    """Whether this process is the run's first (writes the record): the trainer's word once it exists, else
    the launcher's environment (LOCAL_RANK, NODE_RANK)."""
    if trainer is not None:
        return bool(trainer.is_global_zero)
    return int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0


def record_status(path: Path) -> str | None:
    """A results.json's ``status``: "ok", "failed" or "interrupted" (:meth:`RunRecord.from_json`: format 1
    records are ok);
    None when there is no such file or it cannot be read (a run killed while writing it)."""
    try:
        return RunRecord.read(path).status
    except (OSError, ValueError):
        return None


def job_overrides() -> list[str]:
    """The Hydra job's command-line and sweep overrides (as ``.hydra/overrides.yaml``); [] outside Hydra."""
    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)


def summary_line(record: RunRecord) -> str:
    """A finished run's one line: task, attention config (the report's label: ``favor_plus``, not ``favor``), best
    validation and test metrics, size, speed, memory, time."""
    m = record.metrics
    test = " ".join(f"{k}={v:.4g}" for k, v in sorted(m.test.items()))
    if (m.test_checkpoint or {}).get("checkpoint") == "last":
        test += " (last weights: no best checkpoint)"
    label = record.attention_config or record.attention
    return (f"[{record.task} / {label}] best {m.monitor}={_fmt(m.val_best)} {test} | "
            f"{record.num_parameters:,} params | {_fmt(record.train_tokens_per_s)} tok/s | "
            f"{record.peak_memory_mib:.0f} MiB | {record.wall_time_s:.0f} s")


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"
