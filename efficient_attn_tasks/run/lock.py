"""Who may use a single run's dir: one live run at a time (:func:`hold_run_dir`, an ``fcntl.flock`` on
``<run dir>/.run.lock`` held for the run's life), and a new run only where no earlier run left its records
(:func:`earlier_run`) unless it resumes that run (``ckpt_path=last`` or a checkpoint inside the dir) or
says ``overwrite=true`` (:func:`clear_run` removes the earlier run's outputs). :class:`RunDirGuard`, a Hydra
callback of configs/train.yaml, applies both before Hydra writes ``.hydra/`` into the dir.

In DDP only the launching process (rank 0) holds the lock: the processes Lightning starts for the other ranks
run the same command in the same dir. A multirun job holds its job dir's lock while it runs (a sweep dir is
new, or is resumed with ``ckpt_path=last``, so nothing more is checked); a job whose lock another launch holds
is skipped (:func:`held_elsewhere`), and the sweep summary tells a job that is running in another launch
(:func:`holder`) from one that failed, and a job this launch ran from one another launch ran
(:func:`mark_launch`, :func:`launch_of`).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import sys
from pathlib import Path
from typing import IO, Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from efficient_attn_tasks.run.record import RESULTS_JSON, record_status

RUN_LOCK = ".run.lock"
LAUNCH_MARK = ".launch"  # the id of the multirun launch that last started the job in this dir
# what a run writes into its dir besides Hydra's .hydra/ and log (run/fit.py, run/loggers.py, run/curves.py)
RUN_OUTPUTS = (RESULTS_JSON, "checkpoints", "curves.csv", "curves.png", "test_hypotheses.txt", "metrics.csv",
               "hparams.yaml", "wandb", "wandb_id")


class RunDirBusy(RuntimeError):
    """Another live run holds the run dir's lock."""


def hold_run_dir(run_dir: Path) -> IO[str]:
    """Lock ``run_dir`` for this process (created if missing): the open lock file, which holds the lock
    until it is closed or the process ends. Raises :class:`RunDirBusy` at once if another run holds it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = open(run_dir / RUN_LOCK, "a+")  # noqa: SIM115 - held open for the run's life
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        pid = lock.read().strip() or "?"
        lock.close()
        raise RunDirBusy(f"run dir {run_dir} is in use by another run (pid {pid})") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


def holder(run_dir: Path) -> str | None:
    """The pid (as written) of the live run holding ``run_dir``'s lock, else None (no lock file, or free)."""
    path = run_dir / RUN_LOCK
    if not path.is_file():
        return None
    with open(path) as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return lock.read().strip() or "?"
    return None


def held_elsewhere(run_dir: Path) -> str | None:
    """The pid of another process holding ``run_dir``'s lock, else None: a multirun job whose
    :class:`RunDirGuard` could not take the lock must not run. Ranks other than 0 never hold the lock, so they
    are never told this."""
    pid = holder(run_dir)
    return pid if pid is not None and pid != str(os.getpid()) and launching_process() else None


def mark_launch(run_dir: Path, launch: str) -> None:
    """Say that the multirun launch ``launch`` started the job of ``run_dir`` (it holds the dir's lock)."""
    (run_dir / LAUNCH_MARK).write_text(f"{launch}\n")


def launch_of(run_dir: Path) -> str | None:
    """The id of the launch that last started the job of ``run_dir``, else None (no job marked it)."""
    try:
        return (run_dir / LAUNCH_MARK).read_text().strip() or None
    except OSError:
        return None


def earlier_run(run_dir: Path) -> str | None:
    """What in ``run_dir`` shows an earlier run that trained ("results.json", "checkpoints/"), else None.
    A failed or interrupted record with no checkpoint (a run stopped before it saved) is no such run: a new run
    replaces it."""
    checkpoints = run_dir / "checkpoints"
    if checkpoints.is_dir() and any(checkpoints.iterdir()):
        return "checkpoints/"
    if (run_dir / RESULTS_JSON).is_file() and record_status(run_dir / RESULTS_JSON) not in ("failed", "interrupted"):
        return RESULTS_JSON
    return None


def resumes(ckpt_path: str | None, run_dir: Path) -> bool:
    """Whether ``ckpt_path`` continues the run of ``run_dir``: ``last``, or a checkpoint file inside it."""
    if ckpt_path is None:
        return False
    if str(ckpt_path) == "last":
        return True
    return run_dir.resolve() in Path(str(ckpt_path)).resolve().parents


def clear_run(run_dir: Path) -> None:
    """Remove the outputs of an earlier run (:data:`RUN_OUTPUTS`) from ``run_dir``; anything else stays."""
    for name in RUN_OUTPUTS:
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def claim_run_dir(run_dir: Path, ckpt_path: str | None, overwrite: bool) -> IO[str]:
    """Lock ``run_dir`` (:func:`hold_run_dir`) and check that this run may use it: an earlier run's dir only
    to resume it or with ``overwrite`` (which clears it first). Raises :class:`RunDirBusy` or ValueError
    with the message for the user; returns the held lock."""
    if overwrite and str(ckpt_path) == "last":
        raise ValueError("overwrite=true and ckpt_path=last contradict each other; give one of them")
    lock = hold_run_dir(run_dir)
    found = earlier_run(run_dir)
    if found and not resumes(ckpt_path, run_dir):
        if not overwrite:
            lock.close()
            raise ValueError(f"run dir {run_dir} holds an earlier run ({found}); resume it with ckpt_path=last, "
                             "replace it with overwrite=true, or choose another hydra.run.dir")
        clear_run(run_dir)
    return lock


def launching_process() -> bool:
    """False in the processes a DDP launcher started for ranks other than 0 (RANK or LOCAL_RANK set, not 0)."""
    return all(os.environ.get(var, "0") == "0" for var in ("RANK", "LOCAL_RANK"))


class RunDirGuard(Callback):
    """Hydra callback of a single run (configs/train.yaml): :func:`claim_run_dir` on ``hydra.run.dir``
    before Hydra writes into it; a refusal prints one ``error: ...`` line and exits 2. The lock is held
    until the run ends."""

    def __init__(self) -> None:
        self.lock: IO[str] | None = None

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not launching_process():
            return
        HydraConfig.instance().set_config(config)  # as Hydra resolves the run dir (hydra.core.utils.run_job)
        run_dir = Path(os.path.abspath(str(OmegaConf.select(config, "hydra.run.dir"))))
        try:
            self.lock = claim_run_dir(run_dir, config.get("ckpt_path"), bool(config.get("overwrite")))
        except (RunDirBusy, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.lock is not None:
            self.lock.close()
            self.lock = None

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        """A multirun job: hold its dir's lock for the job (a single run holds it from ``on_run_start``). A job
        another launch holds is left to it: the job sees that (:func:`held_elsewhere`) and skips itself."""
        if _multirun_job(config):
            try:
                self.lock = hold_run_dir(Path(str(config.hydra.runtime.output_dir)))
            except RunDirBusy:  # raising here would only make Hydra warn
                self.lock = None

    def on_job_end(self, config: DictConfig, **kwargs: Any) -> None:
        if _multirun_job(config):
            self.on_run_end(config)


def _multirun_job(config: DictConfig) -> bool:
    mode = OmegaConf.select(config, "hydra.mode")  # hydra.types.RunMode in Hydra's config
    return getattr(mode, "name", mode) == "MULTIRUN" and launching_process()
