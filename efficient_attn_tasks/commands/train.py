"""``efficient-attn-train``: the Hydra app (configs/train.yaml, whose ``hydra.help.template`` is ``--help``) that
runs each job through :func:`efficient_attn_tasks.run.fit.run`, turns its errors and interrupts into one line and an
exit code, and ends a multirun with its summary. Importing it loads neither torch nor Lightning."""

from __future__ import annotations

import shlex
import sys
import traceback
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from efficient_attn_tasks.commands.cli import bare, known_errors
from efficient_attn_tasks.commands.hydra_errors import hydra_usage_errors
from efficient_attn_tasks.config.checks import CONFIG_DIR, ConfigError
from efficient_attn_tasks.run.fit import interrupt_signal, run
from efficient_attn_tasks.run.lock import held_elsewhere, launching_process, mark_launch
from efficient_attn_tasks.run.record import (
    RESULTS_JSON,
    RunRecord,
    rank_zero,
    record_status,
)
from efficient_attn_tasks.run.resume import remove_unstarted_run_dir, requeued_checkpoint, resume_argv
from efficient_attn_tasks.tasks.data import DataError

if TYPE_CHECKING:
    pass


def resume_command(argv: Sequence[str], out_dir: Path, sweep_dir: Path | None) -> str:
    """The command that continues an interrupted run: ``argv`` (this command's arguments, with the run dir
    ``main`` found when it resumed) with ``ckpt_path=last``; a multirun keeps its ``hydra.sweep.dir``, a run with
    no last.ckpt names its run dir (``ckpt_path=last`` then starts it again there). A run started with
    ``init_from`` keeps it: with ``ckpt_path=last`` it resumes from its own last.ckpt, or starts again from
    ``init_from`` when it has none."""
    args = [a for a in argv if not a.startswith("ckpt_path=")]
    if sweep_dir is not None and not any(a.startswith("hydra.sweep.dir=") for a in args):
        args.append(f"hydra.sweep.dir={sweep_dir}")
    elif sweep_dir is None and not any(a.startswith("hydra.run.dir=") for a in args) and \
            not (out_dir / "checkpoints" / "last.ckpt").is_file():
        args.append(f"hydra.run.dir={out_dir}")
    return shlex.join(["efficient-attn-train", *args, "ckpt_path=last"])


SWEEP_FAILED_EXIT = 1  # a multirun in which a job failed (or left no results.json) ends with this exit code


class RunSummary(Callback):
    """Hydra callback (configs/train.yaml, every multirun): print the compact table of
    efficient_attn_tasks/report/summary.py, then exit with ``SWEEP_FAILED_EXIT`` if a job of this launch failed,
    so a script sees it (the jobs themselves return, for the sweep to go on: ``_app``). Each job this launch
    starts is marked with the launch's id (``mark_launch``), so the jobs of another launch sharing the sweep dir
    do not set this launch's exit code."""

    def __init__(self) -> None:
        self.launch: str | None = None  # set before the launcher sends this callback to its job processes

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.launch = uuid.uuid4().hex

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        out_dir = Path(str(config.hydra.runtime.output_dir))
        if self.launch is not None and launching_process() and not held_elsewhere(out_dir):
            mark_launch(out_dir, self.launch)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from efficient_attn_tasks.report.summary import summarize

        text, failed = summarize(config.hydra.sweep.dir, self.launch)
        print("\n" + text)
        if failed:
            print(f"error: {failed} job(s) of this launch failed (listed above); exit code {SWEEP_FAILED_EXIT}",
                  file=sys.stderr)
            sys.exit(SWEEP_FAILED_EXIT)  # a SystemExit: Hydra's callback runner lets it through


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def _app(cfg: DictConfig) -> None:
    """One run, or one job of a multirun. A failure has written its record (``run``) and prints ``error: ...``;
    a single run then exits 2 (a config, data or non-finite error; a config or data error that left nothing
    else removes its run dir, as a typo should leave no run behind) or raises (any other error); a multirun
    job returns instead, so the next job runs and the sweep ends with its summary (``RunSummary``)."""
    from hydra.types import RunMode

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    sweep = HydraConfig.get().mode == RunMode.MULTIRUN
    if sweep and (pid := held_elsewhere(out_dir)):  # RunDirGuard.on_job_start left it to the launch holding it
        print(f"job {out_dir} is running in another launch (pid {pid}); this launch skips it", file=sys.stderr)
        return
    if sweep:  # a job of its sweep dir, which SLURM may requeue (hydra/launcher=slurm): it resumes there
        cfg.ckpt_path = requeued_checkpoint(cfg.ckpt_path)
    try:
        run(cfg, out_dir)
    except (ConfigError, DataError, FloatingPointError) as err:
        print(f"error: {err}", file=sys.stderr)
        if sweep:
            print(f"job {out_dir} failed (results.json status failed); the sweep goes on", file=sys.stderr)
            return
        if not isinstance(err, FloatingPointError):
            remove_unstarted_run_dir(out_dir)
        sys.exit(2)
    except (KeyboardInterrupt, SystemExit) as err:  # Ctrl-C, SIGTERM: the run saved last.ckpt and its record
        stop = interrupt_signal(err)
        if stop is None:
            raise
        if rank_zero():
            results = out_dir / RESULTS_JSON
            what = RunRecord.read(results).error.message if record_status(results) == "interrupted" else \
                f"interrupted by {stop.name}"
            sweep_dir = Path(HydraConfig.get().sweep.dir) if sweep else None
            print(f"{what}; resume with: {resume_command(sys.argv[1:], out_dir, sweep_dir)}",
                  file=sys.stderr)
        sys.exit(128 + stop)  # 130 after Ctrl-C, 143 after SIGTERM
    except Exception:  # a bug or e.g. out of memory: the traceback, and in a sweep the next job
        if not sweep:
            raise
        traceback.print_exc()
        print(f"job {out_dir} failed (results.json status failed); the sweep goes on", file=sys.stderr)


def main() -> None:
    """``efficient-attn-train``: no arguments prints the help (a bare run would start a long ListOps
    training); ``ckpt_path=last`` without a run dir continues this command's latest run."""
    if bare(None):
        sys.argv.append("--help")
    with known_errors():
        sys.argv[1:] = resume_argv(sys.argv[1:], Path.cwd() / "outputs")
    with hydra_usage_errors():  # a key or config name typo: one line with "did you mean", exit status 2
        _app()


if __name__ == "__main__":  # python -m: run the importable module's app, not this __main__ copy's, as joblib's
    from efficient_attn_tasks.commands import train  # workers unpickle the Hydra task function by its module's name

    train.main()
