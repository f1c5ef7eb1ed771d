"""One training run: build the task, fit, test the best checkpoint, write the run record; what
``efficient-attn-train`` runs for each job, callable from Python as ``run(cfg, out_dir)``."""

from __future__ import annotations

import inspect
import os
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from efficient_attn_tasks.config.checks import ConfigError, check_config
from efficient_attn_tasks.run.machine import reset_peak_memory
from efficient_attn_tasks.run.record import (
    RESULTS_JSON,
    Attempt,
    RunRecord,
    checkpoint_step,
    feature_redraws,
    record_status,
    run_record,
    summary_line,
    tested_checkpoint,
    training_verdict,
    write_failed_record,
)
from efficient_attn_tasks.run.resume import check_checkpoint, resume_checkpoint
from efficient_attn_tasks.run.threads import busy_cores, default_threads

if TYPE_CHECKING:
    import pytorch_lightning as pl


def run(cfg: DictConfig, out_dir: Path, callbacks: Sequence[pl.Callback] = (),
        plugins: Sequence[Any] = ()) -> RunRecord:
    """Train, test the best checkpoint, write results.json (``"status": "ok"``); returns the record.

    ``ckpt_path=last`` resumes from ``<out_dir>/checkpoints/last.ckpt`` (same W&B run id, same results.json);
    a run dir whose record says ok is not run again, one whose record says failed or interrupted is. A run that
    raises first writes its failed record, so a sweep shows which job failed, where and why; one stopped by
    Ctrl-C or SIGTERM saves last.ckpt at the end of its step (SaveOnInterrupt), writes its interrupted record and
    raises on (:func:`interrupt_signal` names the signal). ``callbacks`` (e.g. from tests)
    join the app's own and the ``callbacks`` group's; ``plugins`` go to the Trainer (e.g. fp16 AMP with a
    gradient scaler on CPU, with ``trainer.precision=null``: ``16-mixed`` means bf16 there).
    """
    attempt = Attempt(time.perf_counter())
    try:
        return _train(cfg, out_dir, callbacks, plugins, attempt)
    except Exception as err:
        write_failed_record(cfg, out_dir, err, attempt)
        raise
    except (KeyboardInterrupt, SystemExit) as err:
        stop = interrupt_signal(err)
        if stop is not None:
            saved = saved_step(attempt.trainer)
            what = f"interrupted at step {attempt.step} by {stop.name}; " + \
                (f"saved {out_dir / 'checkpoints' / 'last.ckpt'}" if saved is not None else "no checkpoint saved")
            kind = KeyboardInterrupt if stop == signal.SIGINT else type(err)
            write_failed_record(cfg, out_dir, kind(what), attempt, status="interrupted")
        raise


def interrupt_signal(err: BaseException) -> signal.Signals | None:
    """The signal behind an exception that ends a run: SIGTERM (Lightning's SIGTERMException), SIGINT (a
    KeyboardInterrupt, or the exit Lightning makes after handling one), else None."""
    if type(err).__name__ == "SIGTERMException":  # Lightning's, raised at the end of the step after SIGTERM
        return signal.SIGTERM
    if isinstance(err, KeyboardInterrupt) or (isinstance(err, SystemExit) and
                                              isinstance(err.__context__, KeyboardInterrupt)):
        return signal.SIGINT
    return None


def saved_step(trainer: pl.Trainer | None) -> int | None:
    """The step at which the trainer's SaveOnInterrupt saved last.ckpt; None when it saved none."""
    for callback in getattr(trainer, "callbacks", None) or []:
        if hasattr(callback, "saved_step") and callback.saved_step is not None:
            return int(callback.saved_step)
    return None


def _train(cfg: DictConfig, out_dir: Path, callbacks: Sequence[pl.Callback], plugins: Sequence[Any],
           attempt: Attempt) -> RunRecord:
    task = check_config(cfg)
    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.callbacks import ModelCheckpoint

    from efficient_attn_tasks.config.labels import attention_label
    from efficient_attn_tasks.run.callbacks import (
        CurveLog,
        EpochLine,
        LastAtValidation,
        NonFiniteGuard,
        SaveOnInterrupt,
        Throughput,
        ValidateAtMaxSteps,
        WallClock,
        check_at_validation,
        early_stopping_outcome,
        keep_averaged_weights_for_test,
        progress_bar,
        quiet_lightning,
    )
    from efficient_attn_tasks.run.loggers import finish_wandb, make_logger, wandb_offline_note

    quiet_lightning()
    ckpt_path = resume_checkpoint(cfg.ckpt_path, out_dir)
    if ckpt_path == "done":
        record = RunRecord.read(out_dir / RESULTS_JSON)
        print(f"{out_dir} already finished (results.json); nothing to resume")
        return record
    attempt.resumed_from = ckpt_path
    if ckpt_path:
        check_checkpoint(ckpt_path, cfg)  # another task's or shape's checkpoint: refused before the data is built
    source = None
    if cfg.get("init_from") is not None and not ckpt_path:  # a new run (a resumed one has its own weights);
        # read and checked before anything of the run is built
        from efficient_attn_tasks.inference.checkpoint import read_source
        from efficient_attn_tasks.run.convert import init_from

        source = read_source(cfg, task)
        if cfg.get("transfer_steps"):
            from efficient_attn_tasks.run.transfer import check_teacher

            check_teacher(source.cfg, cfg.transfer_steps, task.ATTENTION_SITES)
    set_threads(cfg.threads)
    # Our loaders resume mid-epoch through the module's saved data position (efficient_attn_tasks/tasks/sampling.py).
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
    # Lightning's own use of a torch API that torch deprecated; nothing a user can act on.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    # DDP: every process logs the whole split's val/test metrics (it evaluates the whole split, or translation
    # gathers every process's share), so Lightning's advice to average them over the processes does not apply.
    warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\('(val|test)/")
    pl.seed_everything(cfg.seed, workers=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    if record_status(out_dir / RESULTS_JSON) in RunRecord.STOPPED:  # an earlier attempt's: this one runs it again
        (out_dir / RESULTS_JSON).unlink(missing_ok=True)
    reset_peak_memory()
    try:
        try:
            if source is not None and hasattr(task, "restore"):  # e.g. translation: the checkpoint's tokenizer
                datamodule, module = task.restore(cfg, source.checkpoint)
            else:
                datamodule, module = task.build(cfg)
            if source is not None:  # before any data is read (translation's tokenizer came from the checkpoint)
                init_from(module, source, cfg, task.ATTENTION_SITES)
        except ConfigError:
            raise
        except ValueError as err:  # a task config value its checks reject (e.g. impossible ListOps lengths)
            raise ConfigError(f"task.{cfg.task.name}: {err}") from None
        logger = make_logger(cfg, out_dir)
        checkpoints = out_dir / "checkpoints"
        # No versioned names: a resumed run's callbacks may not know the last.ckpt already there (SaveOnInterrupt
        # wrote it, or the dir moved) and would save last-v1.ckpt beside it, leaving ckpt_path=last an older one.
        best = ModelCheckpoint(dirpath=checkpoints, monitor=module.monitor, mode=module.monitor_mode, save_last=True,
                               filename="best-{step}", enable_version_counter=False)
        throughput, guard, curves = Throughput(), NonFiniteGuard(cfg.nonfinite, attention_label(cfg)), CurveLog()
        own = [best, LastAtValidation(checkpoints / "last.ckpt"), throughput, guard,
               SaveOnInterrupt(checkpoints / "last.ckpt"), ValidateAtMaxSteps(), curves, WallClock(attempt)]
        if cfg.checkpoint_every:
            own.append(ModelCheckpoint(dirpath=checkpoints, every_n_train_steps=int(cfg.checkpoint_every),
                                       save_top_k=0, save_last=True, enable_version_counter=False))
        trainer_args = OmegaConf.to_container(cfg.trainer, resolve=True)
        trainer_args["enable_progress_bar"] = progress_bar(trainer_args.get("enable_progress_bar"))
        if not trainer_args["enable_progress_bar"]:
            own.append(EpochLine())
        if plugins:
            trainer_args["plugins"] = [*(trainer_args.get("plugins") or []), *plugins]
        optional = optional_callbacks(cfg.get("callbacks"), module.monitor, module.monitor_mode)
        trainer = pl.Trainer(**trainer_args, default_root_dir=str(out_dir), logger=logger,
                             callbacks=check_at_validation([*own, *optional, *callbacks]))
        attempt.trainer = trainer
        if logger:
            logger.log_hyperparams({"num_parameters": module.num_parameters()})
        from efficient_attn_tasks.run.transfer import transfer_stage

        transfer = transfer_stage(cfg, source is not None, bool(ckpt_path), module, datamodule, trainer, logger,
                                  out_dir)
        if cfg.validate_first and not ckpt_path:  # step 0 of the curves (a resumed run has it in its checkpoint)
            trainer.validate_loop.inference_mode = False  # as fit's validations run: no inference tensors left behind
            trainer.validate(module, datamodule=datamodule, verbose=False)
        fit_start = time.perf_counter()
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        fit_s = time.perf_counter() - fit_start
        val = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}  # before test
        stopped_step, redraws = trainer.global_step, feature_redraws(module)  # test loads the best checkpoint
        best_step = checkpoint_step(best.best_model_path) if best.best_model_path else None
        last_val_step = max((s for s, k, _ in curves.rows if k.startswith("val/")), default=None)
        converged = training_verdict(*early_stopping_outcome(trainer.callbacks), best_step, last_val_step)
        test, tested = {}, None
        if cfg.test:
            tested = tested_checkpoint(best.best_model_path, trainer.global_step, trainer.is_global_zero)
            keep_averaged_weights_for_test(trainer.callbacks)
            fit_states = [(c, c.state_dict()) for c in (throughput, guard, curves)]
            test = trainer.test(module, datamodule=datamodule, ckpt_path=tested["path"], verbose=False)[0]
            for c, state in fit_states:  # test(ckpt_path) loaded the best checkpoint's callback states: the whole run's
                c.load_state_dict(state)
        record = run_record(cfg, module, trainer, best, throughput, val, test, fit_s, attempt.wall_s)
        record.metrics.test_checkpoint = tested
        record.stopped_step, record.best_step, record.converged = stopped_step, best_step, converged
        record.feature_redraws = redraws
        record.skipped_updates = guard.skipped
        record.scaler_skipped_steps = guard.scaler_skipped  # fp16 AMP overflow steps the scaler skipped (normal)
        record.precision = str(trainer.precision)  # as Lightning ran it (16-mixed on CPU becomes bf16-mixed)
        record.resumed_from = str(ckpt_path) if ckpt_path else None
        record.threads = torch.get_num_threads()
        record.transfer = transfer
        if trainer.is_global_zero:
            record.write(out_dir / RESULTS_JSON)
            if getattr(module, "test_hypotheses", None):
                (out_dir / "test_hypotheses.txt").write_text("\n".join(module.test_hypotheses) + "\n")
            draw_curves(curves.rows, out_dir, module.monitor, f"{record.task} / {record.attention_config}")
            print(summary_line(record))
        return record
    finally:
        note = wandb_offline_note()
        finish_wandb()
        if note:
            print(note)


def optional_callbacks(callbacks: DictConfig | None, monitor: str, mode: str) -> list[pl.Callback]:
    """The ``callbacks`` group's entries (checked by :func:`check_callbacks`), instantiated in config order.

    An entry with ``monitor: null`` (and ``mode: null``) watches the task's validation metric in its
    direction, ``monitor``/``mode``: the module's ``monitor``/``monitor_mode``, which also pick the best
    checkpoint (listops: val/acc, max; translation: val/bleu, or val/loss without task.val_bleu).
    """
    from hydra.utils import get_class, instantiate

    out = []
    for name, entry in (callbacks or {}).items():
        task_metric = {}
        if "monitor" in entry and entry.monitor is None:
            task_metric["monitor"] = monitor
            if "mode" in inspect.signature(get_class(entry._target_)).parameters:
                task_metric["mode"] = mode
        try:
            out.append(instantiate(entry, **task_metric))
        except Exception as err:  # noqa: BLE001 - Hydra wraps the class's own error in several lines
            cause = err.__cause__ or err
            raise ConfigError(f"callbacks.{name}: {type(cause).__name__}: {str(cause).splitlines()[0]}") from None
    return out


def draw_curves(rows: list[tuple[int, str, float]], out_dir: Path, monitor: str, title: str) -> None:
    """``curves.csv`` and ``curves.png`` in the run dir (efficient_attn_tasks/run/curves.py); a failure is a
    warning line, never the run's: its results are written by then."""
    from efficient_attn_tasks.run.curves import CURVES_PNG, plot_run, read_curves, write_curves

    try:
        plot_run(read_curves(write_curves(rows, out_dir)), monitor, out_dir / CURVES_PNG, title)
    except Exception as err:  # noqa: BLE001 - matplotlib, fonts, disk: any of them
        print(f"warning: learning curves not drawn ({type(err).__name__}: {err}); results.json is complete",
              file=sys.stderr)


def set_threads(threads: int | None) -> None:
    """Torch's threads for this run (:func:`default_threads`); one line when other processes' load cut them."""
    import torch

    if threads:
        torch.set_num_threads(int(threads))
        return
    n_jobs = joblib_n_jobs()
    busy = busy_cores() if n_jobs is None or n_jobs == 1 else None
    chosen = default_threads(None, n_jobs, os.cpu_count() or 1, busy)
    if chosen and chosen < torch.get_num_threads():  # never more than torch's own default (physical cores)
        torch.set_num_threads(chosen)
        if busy is not None and busy >= 0.5:
            print(f"{busy:.1f} of {os.cpu_count()} cores busy with other work at the start: {chosen} torch "
                  f"thread{'s' if chosen > 1 else ''} (threads=N sets it)", flush=True)


def joblib_n_jobs() -> int | None:
    """``hydra.launcher.n_jobs`` when this process runs a multirun job under Hydra's joblib launcher, else None
    (joblib's own n_jobs=None means one job at a time)."""
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN or "joblib" not in str(hydra_cfg.launcher.get("_target_", "")).lower():
        return None
    n_jobs = hydra_cfg.launcher.get("n_jobs")
    return 1 if n_jobs is None else int(n_jobs)
