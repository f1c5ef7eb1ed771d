"""A run's record, ``results.json``: what a finished run measured (:func:`run_record`), or who a failed run
was and why it stopped (:func:`failed_record`); which checkpoint the test split used, the run's one-line
summary, and the memory, hardware and version facts every record carries.

Importing this module loads neither torch nor Lightning; the helpers that read torch import it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


@dataclasses.dataclass
class Attempt:
    """A run in progress, as its failed record needs it: when it started, where it resumed from, its Trainer
    once built (the step it reached)."""

    start: float
    resumed_from: str | None = None
    trainer: Any = None

    @property
    def step(self) -> int:
        return int(self.trainer.global_step) if self.trainer is not None else 0


def tested_checkpoint(best_path: str, last_step: int, announce: bool = True) -> dict[str, Any]:
    """Which weights the test split is evaluated with: ``{"checkpoint": "best", "path", "step"}``, the
    best checkpoint by the task's validation metric; or, when there is none (validation never ran:
    ``trainer.limit_val_batches=0``, a run shorter than its validation interval, ``fast_dev_run``),
    ``{"checkpoint": "last", "path": None, "step": last_step}``, the weights at the end of training,
    said in a warning line (``announce``: this process prints) so a test metric never hides its source.
    """
    if best_path:
        import torch

        step = torch.load(best_path, map_location="cpu", weights_only=False, mmap=True)["global_step"]
        return {"checkpoint": "best", "path": best_path, "step": int(step)}
    if announce:
        print(f"warning: no best checkpoint (validation never ran); testing the last weights, step {last_step}; "
              "results.json says test_checkpoint: last", file=sys.stderr)
    return {"checkpoint": "last", "path": None, "step": last_step}


def run_record(cfg, module, trainer, checkpoint, throughput, val, test, fit_s, wall_s) -> dict[str, Any]:
    """results.json of a finished run (``"status": "ok"``): who it was, its config and overrides, its validation
    and test metrics, size, steps, throughput, peak memory, times, hardware and versions; ``run`` adds the
    tested checkpoint, skipped updates, precision, resume point and threads."""
    from efficient_attn_tasks.config.labels import attention_config, attention_label

    best = checkpoint.best_model_score
    return {
        "name": cfg.name,
        "task": cfg.task.name,
        "attention": attention_label(cfg),  # attention.name, or the model.layer_attentions joined by "+"
        "attention_config": attention_config(cfg),  # its config file (favor_relu where attention is favor)
        "seed": cfg.seed,
        "status": "ok",  # "failed": failed_record
        "config": OmegaConf.to_container(cfg, resolve=True),
        "overrides": job_overrides(),
        "metrics": {
            "monitor": module.monitor,
            "val_best": float(best) if best is not None else val.get(module.monitor),
            "val_last": val,
            "test": {k: float(v) for k, v in test.items()},
            "best_checkpoint": checkpoint.best_model_path or None,
        },
        "bleu_signature": getattr(module, "bleu_signature", None),
        "num_parameters": module.num_parameters(),
        "epochs": trainer.fit_loop.epoch_progress.current.completed,  # completed epochs
        "steps": trainer.global_step,
        "processes": trainer.world_size,  # DDP: devices × nodes
        "train_tokens": throughput.tokens,  # of all processes
        "train_tokens_per_s": throughput.tokens_per_s,  # global: all processes' tokens / training seconds
        "train_tokens_per_s_scope": "global (sum over processes)",
        "peak_memory_mib": peak_memory_mib(),
        "fit_time_s": fit_s,
        "wall_time_s": wall_s,
        "hardware": hardware(),
        "versions": versions(),
    }


MESSAGE_CHARS = 1000  # a failed record's error message is cut here (an error can print a whole tensor)


def failed_record(cfg: DictConfig, err: BaseException, attempt: Attempt) -> dict[str, Any]:
    """results.json of a run that raised ``err``: who it was (name, task, attention, seed, config, overrides, as
    a finished run's record), ``"status": "failed"``, the error's type and one-line message, the step it reached
    (0 before training), its wall time. No metrics: readers never average a failed run into a table."""
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
    return {
        "name": OmegaConf.select(cfg, "name", default=None),
        "task": OmegaConf.select(cfg, "task.name", default=None),
        "attention": attention,
        "seed": OmegaConf.select(cfg, "seed", default=None),
        "status": "failed",
        "error": {"type": type(err).__name__, "message": message[:MESSAGE_CHARS]},
        "config": config,
        "overrides": job_overrides(),
        "steps": attempt.step,
        "resumed_from": str(attempt.resumed_from) if attempt.resumed_from else None,
        "wall_time_s": time.perf_counter() - attempt.start,
        "versions": versions(),
    }


def write_failed_record(cfg: DictConfig, out_dir: Path, err: BaseException, attempt: Attempt) -> None:
    """Write :func:`failed_record` to ``out_dir/results.json`` (rank zero only), unless that file is a finished
    run's record (ok): a later attempt's error does not erase a result."""
    rank_zero = attempt.trainer.is_global_zero if attempt.trainer is not None else \
        int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0
    if not rank_zero or record_status(out_dir / "results.json") == "ok":
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(failed_record(cfg, err, attempt), indent=2) + "\n")


def record_status(path: Path) -> str | None:
    """A results.json's ``status``: "ok" or "failed" (records written before the field existed are ok);
    None when there is no such file or it cannot be read (a run killed while writing it)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record.get("status", "ok") if isinstance(record, dict) else None


def job_overrides() -> list[str]:
    """The Hydra job's command-line and sweep overrides (as ``.hydra/overrides.yaml``); [] outside Hydra."""
    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)


def reset_peak_memory() -> None:
    """Start a fresh peak for this run (multirun jobs share one process)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets the peak resident set size (VmHWM)
    except OSError:
        pass


def peak_memory_mib() -> float:
    """Peak GPU memory allocated if CUDA was used, else the process's peak resident set size since
    :func:`reset_peak_memory` (Linux VmHWM; elsewhere the lifetime peak)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        status = Path("/proc/self/status").read_text().splitlines()
        return next(int(ln.split()[1]) for ln in status if ln.startswith("VmHWM")) / 1024  # kB
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def hardware() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    cpu = platform.processor() or platform.machine()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        names = [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("efficient-attn", "torch", "pytorch-lightning", "hydra-core", "wandb", "sacrebleu", "sentencepiece"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def summary_line(record: dict[str, Any]) -> str:
    m = record["metrics"]
    test = " ".join(f"{k}={v:.4g}" for k, v in sorted(m["test"].items()))
    if (m.get("test_checkpoint") or {}).get("checkpoint") == "last":
        test += " (last weights: no best checkpoint)"
    tps = record["train_tokens_per_s"]
    return (f"[{record['task']} / {record['attention']}] best {m['monitor']}={_fmt(m['val_best'])} {test} | "
            f"{record['num_parameters']:,} params | {_fmt(tps)} tok/s | "
            f"{record['peak_memory_mib']:.0f} MiB | {record['wall_time_s']:.0f} s")


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"
