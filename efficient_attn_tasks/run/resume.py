"""Resuming and cleaning up run dirs: ``ckpt_path=last`` as a checkpoint of this run dir
(:func:`resume_checkpoint`) or, on the command line, as the latest run dir of the same overrides
(:func:`resume_argv`), or for a sweep job that SLURM requeued (:func:`requeued_checkpoint`); and removing a run dir
that a config or data error stopped before it wrote anything (:func:`remove_unstarted_run_dir`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from efficient_attn_tasks.config.checks import ConfigError
from efficient_attn_tasks.run.lock import RUN_LOCK
from efficient_attn_tasks.run.record import RESULTS_JSON, record_status


def resume_checkpoint(ckpt_path: str | None, out_dir: Path) -> str | None:
    """``last`` -> this run dir's last.ckpt (None if it has none yet, "done" if the run finished: its
    results.json says ok; a failed run is run again, from its last.ckpt if it has one)."""
    if ckpt_path != "last":
        if ckpt_path and not Path(ckpt_path).is_file():
            raise ConfigError(f"ckpt_path={ckpt_path} is not a file; give a .ckpt file or ckpt_path=last")
        return ckpt_path
    if record_status(out_dir / RESULTS_JSON) == "ok":
        return "done"
    last = out_dir / "checkpoints" / "last.ckpt"
    if last.is_file():
        print(f"resuming from {last}")
        return str(last)
    print(f"ckpt_path=last: no checkpoint in {out_dir} yet; starting from the beginning")
    return None


# the model keys that set its parameters' shapes (efficient_attn.transformer.TransformerConfig): a checkpoint
# trained with other values cannot be loaded into this config's model
SHAPE_KEYS = ("d_model", "num_heads", "head_dim", "d_ff", "encoder_layers", "decoder_layers", "positional",
              "tie_embeddings")


def checkpoint_config(ckpt_path: str) -> dict[str, Any] | None:
    """The run config saved in a checkpoint of efficient-attn-train (None: one this check cannot read without
    running its code, left to Lightning); a file that is no checkpoint at all is a ConfigError."""
    import pickle
    import zipfile

    import torch

    if not zipfile.is_zipfile(ckpt_path):  # torch.save writes a zip archive
        raise ConfigError(f"ckpt_path={ckpt_path} is not a checkpoint file (not a torch.save archive); give a .ckpt "
                          "file of efficient-attn-train or ckpt_path=last")
    try:  # mmap: the tensors are not read
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:  # objects beyond tensors and plain data: Lightning loads it
        return None
    except Exception as err:  # noqa: BLE001 - truncated, not a torch file
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"ckpt_path={ckpt_path} cannot be read as a checkpoint ({reason}); give a .ckpt file "
                          "of efficient-attn-train or ckpt_path=last") from None
    config = checkpoint.get("hyper_parameters", {}).get("config") if isinstance(checkpoint, dict) else None
    if not isinstance(config, dict):
        raise ConfigError(f"ckpt_path={ckpt_path} is not a checkpoint of efficient-attn-train (no run config in it)")
    return config


def check_checkpoint(ckpt_path: str, cfg: DictConfig) -> None:
    """Refuse, before any data is built, a checkpoint whose weights cannot load into this config's model: another
    task, another vocabulary size, or another model shape (:data:`SHAPE_KEYS`)."""
    saved = checkpoint_config(ckpt_path)
    if saved is None:
        return
    task, model = saved.get("task") or {}, saved.get("model") or {}
    if task.get("name") != cfg.task.get("name"):
        raise ConfigError(f"ckpt_path={ckpt_path} is a checkpoint of task {task.get('name')!r}, but this run's task is "
                          f"{cfg.task.get('name')!r}; give a checkpoint of a {cfg.task.get('name')} run, or "
                          f"task={task.get('name')} with its run's config")
    wanted = [(f"task.{k}", task.get(k), cfg.task.get(k)) for k in ("vocab_size",) if k in task and k in cfg.task]
    wanted += [(f"model.{k}", model.get(k), cfg.model.get(k)) for k in SHAPE_KEYS if k in model and k in cfg.model]
    differ = [f"{key}={mine} (checkpoint: {theirs})" for key, theirs, mine in wanted if theirs != mine]
    if differ:
        raise ConfigError(f"ckpt_path={ckpt_path}: its model has another shape than this config's: "
                          f"{', '.join(differ)}; set them as the checkpoint's run did, or start without ckpt_path")


def resume_argv(argv: list[str], outputs: Path) -> list[str]:
    """Add ``hydra.run.dir=<latest run dir of the same overrides>`` when resuming a single run.

    The run dir must hold ``checkpoints/last.ckpt``; multiruns resume with the same
    ``hydra.sweep.dir`` instead (each job finds its own last.ckpt).
    """
    if "ckpt_path=last" not in argv or any(a.startswith("hydra.run.dir=") for a in argv) or \
            any(a in ("-m", "--multirun") for a in argv):
        return argv
    wanted = sorted(a for a in argv if not a.startswith("ckpt_path=") and not a.startswith("-"))
    candidates = sorted(outputs.glob("*/*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)
    for last in candidates:
        run_dir = last.parent.parent
        overrides = OmegaConf.load(run_dir / ".hydra" / "overrides.yaml") if (run_dir / ".hydra").is_dir() else []
        if sorted(o for o in overrides if not o.startswith("ckpt_path=")) == wanted:
            print(f"ckpt_path=last: continuing {run_dir}")
            return [*argv, f"hydra.run.dir={run_dir}"]
    raise ConfigError(f"ckpt_path=last: no run of these overrides {wanted} with checkpoints/last.ckpt under "
                      f"{outputs}; pass hydra.run.dir=<run dir> or ckpt_path=<file.ckpt>")


def requeued_checkpoint(ckpt_path: str | None, environ: Mapping[str, str] = os.environ) -> str | None:
    """``last`` for a job that SLURM restarted (``SLURM_RESTART_COUNT`` > 0: requeued after its time limit, a
    preemption or a node failure, e.g. by hydra/launcher=slurm) and that names no checkpoint: it continues from its
    run dir's last.ckpt instead of training from the start; ``ckpt_path`` otherwise."""
    if ckpt_path is None and int(environ.get("SLURM_RESTART_COUNT") or 0) > 0:
        print(f"SLURM restarted this job ({environ['SLURM_RESTART_COUNT']} time(s)): ckpt_path=last")
        return "last"
    return ckpt_path


def remove_unstarted_run_dir(out_dir: Path) -> bool:
    """Delete a run dir that holds only what Hydra put there (``.hydra/``, the job's ``.log``) and the run's
    failed record: the run stopped on its config or data before writing anything else, so nothing is lost
    and no empty run is left."""
    try:
        out_dir = out_dir.resolve()
        entries = list(out_dir.iterdir())
    except OSError:
        return False
    if out_dir == Path.cwd().resolve() or not entries or not all(_unstarted(e) for e in entries):
        return False
    shutil.rmtree(out_dir, ignore_errors=True)
    return True


def _unstarted(entry: Path) -> bool:
    """What a run dir holds before its run writes anything: Hydra's files, the run's lock, or the failed
    record of that run."""
    return entry.name in (".hydra", RUN_LOCK) or (entry.suffix == ".log" and entry.is_file()) or \
        (entry.name == RESULTS_JSON and record_status(entry) == "failed")
