"""Resuming and cleaning up run dirs: ``ckpt_path=last`` as a checkpoint of this run dir
(:func:`resume_checkpoint`) or, on the command line, as the latest run dir of the same overrides
(:func:`resume_argv`), or for a sweep job that SLURM requeued (:func:`requeued_checkpoint`); and removing a run dir
that a config or data error stopped before it wrote anything (:func:`remove_unstarted_run_dir`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Mapping

from omegaconf import OmegaConf

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
