"""``efficient-attn-train``: the Hydra app that trains one task with one attention and records the run.

    efficient-attn-train task=translation attention=favor_plus
    efficient-attn-train -m experiment=quickstart attention=softmax,favor_plus seed=0,1,2

Each run's output dir holds the resolved config (.hydra/), checkpoints/ and results.json.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import json
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pytorch_lightning.callbacks import ModelCheckpoint

from efficient_attn.transformer import AttentionSpec

from .base import AttentionConfig, ModelConfig, NonFiniteGuard, OptimConfig, Throughput, transformer_config
from .data import DataError
from .loggers import LOGGER_KEYS, finish_wandb, make_logger
from .report import find_runs, markdown, table

TASKS = {"translation": "tasks.translation", "listops": "tasks.listops", "lm": "tasks.lm"}
TOP_LEVEL = {"seed", "name", "data_dir", "cache_dir", "ckpt_path", "test", "threads", "nonfinite",
             "optim", "task", "attention", "model", "trainer", "logger"}
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")


class ConfigError(ValueError):
    """A config that cannot run; the message names the key and what to do."""


# ----------------------------------------------------------------------------- strict checks
def check_config(cfg: DictConfig) -> Any:
    """Validate every section against its schema; return the task's module."""
    _known(set(cfg.keys()), TOP_LEVEL, "")
    if cfg.task.get("name") not in TASKS:
        raise ConfigError(f"unknown task {cfg.task.get('name')!r}; choose one of {sorted(TASKS)}")
    task = importlib.import_module(TASKS[cfg.task.name])
    for section, schema in (("task", task.Config), ("model", ModelConfig), ("optim", OptimConfig),
                            ("attention", AttentionConfig)):
        _check_section(cfg[section], schema, section)
    _known(set(cfg.trainer.keys()), set(inspect.signature(pl.Trainer).parameters), "trainer.")
    if cfg.logger.get("kind") not in LOGGER_KEYS:
        raise ConfigError(f"logger.kind must be one of {sorted(LOGGER_KEYS)}, got {cfg.logger.get('kind')!r}")
    _known(set(cfg.logger.keys()), LOGGER_KEYS[cfg.logger.kind], "logger.")
    if cfg.nonfinite not in ("stop", "skip"):
        raise ConfigError(f"nonfinite must be 'stop' or 'skip', got {cfg.nonfinite!r}")
    try:
        transformer_config(cfg)
        for site in ("encoder", "decoder", "cross"):
            chosen = cfg.model.get(f"{site}_attention") or cfg.attention
            _check_section(chosen, AttentionConfig, f"model.{site}_attention")
            AttentionSpec(chosen.name, dict(chosen.kwargs or {})).check(f"{site} attention")
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err)) from None
    return task


def _known(keys: set[str], allowed: set[str], prefix: str) -> None:
    for key in sorted(keys - allowed):
        close = difflib.get_close_matches(key, allowed, n=1)
        hint = f"; did you mean {prefix}{close[0]}?" if close else f"; known keys: {sorted(allowed)}"
        raise ConfigError(f"unknown config key {prefix}{key}{hint}")


def _check_section(node: DictConfig, schema: type, name: str) -> None:
    _known(set(node.keys()), {f.name for f in dataclasses.fields(schema)}, f"{name}.")
    try:
        OmegaConf.merge(OmegaConf.structured(schema), node)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{name}: {str(err).splitlines()[0]}") from None


# ----------------------------------------------------------------------------- one run
def run(cfg: DictConfig, out_dir: Path, callbacks: Sequence[pl.Callback] = ()) -> dict[str, Any]:
    """Train, test the best checkpoint, write results.json; returns the record.

    ``callbacks`` are added to the app's own (checkpointing, throughput), e.g. by tests.
    """
    start = time.perf_counter()
    task = check_config(cfg)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    pl.seed_everything(cfg.seed, workers=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    reset_peak_memory()
    try:
        datamodule, module = task.build(cfg)
        logger = make_logger(cfg, out_dir)
        checkpoint = ModelCheckpoint(dirpath=out_dir / "checkpoints", monitor=module.monitor,
                                     mode=module.monitor_mode, save_last=True, filename="best-{step}")
        throughput, guard = Throughput(), NonFiniteGuard(cfg.nonfinite, cfg.attention.name)
        trainer = pl.Trainer(**OmegaConf.to_container(cfg.trainer, resolve=True), default_root_dir=str(out_dir),
                             logger=logger, callbacks=[checkpoint, throughput, guard, *callbacks])
        if logger:
            logger.log_hyperparams({"num_parameters": module.num_parameters()})
        fit_start = time.perf_counter()
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
        fit_s = time.perf_counter() - fit_start
        val = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}  # before test
        test = {}
        if cfg.test:
            best = checkpoint.best_model_path or None
            test = trainer.test(module, datamodule=datamodule, ckpt_path=best, verbose=False)[0]
        record = _record(cfg, module, trainer, checkpoint, throughput, val, test, fit_s, time.perf_counter() - start)
        record["skipped_updates"] = guard.skipped
        (out_dir / "results.json").write_text(json.dumps(record, indent=2) + "\n")
        if getattr(module, "test_hypotheses", None):
            (out_dir / "test_hypotheses.txt").write_text("\n".join(module.test_hypotheses) + "\n")
        print(summary_line(record))
        return record
    finally:
        finish_wandb()


def _record(cfg, module, trainer, checkpoint, throughput, val, test, fit_s, wall_s) -> dict[str, Any]:
    best = checkpoint.best_model_score
    return {
        "name": cfg.name,
        "task": cfg.task.name,
        "attention": cfg.attention.name,
        "seed": cfg.seed,
        "config": OmegaConf.to_container(cfg, resolve=True),
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
        "train_tokens_per_s": throughput.tokens_per_s,
        "peak_memory_mib": peak_memory_mib(),
        "fit_time_s": fit_s,
        "wall_time_s": wall_s,
        "hardware": hardware(),
        "versions": versions(),
    }


def reset_peak_memory() -> None:
    """Start a fresh peak for this run (multirun jobs share one process)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets the peak resident set size (VmHWM)
    except OSError:
        pass


def peak_memory_mib() -> float:
    """Peak GPU memory allocated if CUDA was used, else the process's peak resident set size since
    :func:`reset_peak_memory` (Linux VmHWM; elsewhere the lifetime peak)."""
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        status = Path("/proc/self/status").read_text().splitlines()
        return next(int(ln.split()[1]) for ln in status if ln.startswith("VmHWM")) / 1024  # kB
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def hardware() -> str:
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
    tps = record["train_tokens_per_s"]
    return (f"[{record['task']} / {record['attention']}] best {m['monitor']}={_fmt(m['val_best'])} {test} | "
            f"{record['num_parameters']:,} params | {_fmt(tps)} tok/s | "
            f"{record['peak_memory_mib']:.0f} MiB | {record['wall_time_s']:.0f} s")


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


class RunSummary(Callback):
    """Hydra callback: after a multirun, print every job's metric, speed and memory side by side."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        records, missing = find_runs([Path(config.hydra.sweep.dir)])
        print(f"\n{len(records)} run(s) in {config.hydra.sweep.dir}\n" + markdown(*table(records, missing)))


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg, Path(HydraConfig.get().runtime.output_dir))
    except (ConfigError, DataError, FloatingPointError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
