"""The app's own Lightning callbacks and console settings: save on SIGTERM, one line per epoch, quiet info lines.

Imported by :func:`tasks.train.run` only when a run starts (it loads Lightning), never by ``--help``
or the config checks.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.utilities.exceptions import SIGTERMException

# Lightning's info lines ("GPU available: ...", "TPU available: ...", "💡 Tip: ...", "`Trainer.fit` stopped")
# go through these loggers at INFO; warnings and errors still show.
QUIET_LOGGERS = ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.seed", "lightning.pytorch.utilities.rank_zero",
                 "lightning_fabric.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


def quiet_lightning() -> None:
    """Hide Lightning's INFO lines (accelerator availability, tips); keep its warnings."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def progress_bar(configured: bool | None, stream=None) -> bool:
    """``trainer.enable_progress_bar``: true/false as set; null (the default) = bars only on a TTY."""
    if configured is not None:
        return bool(configured)
    stream = sys.stdout if stream is None else stream
    return bool(getattr(stream, "isatty", lambda: False)())


class EpochLine(pl.Callback):
    """One line per training epoch (instead of a progress bar): epoch, step, train loss, the task's
    validation metric and elapsed time, e.g. ``epoch 2/6 step 158 train/loss 1.234 val/bleu 45.6 12s``."""

    def __init__(self, stream=None) -> None:
        self.stream = stream
        self.start = time.perf_counter()

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        metrics = trainer.callback_metrics
        total = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        parts = [f"epoch {trainer.current_epoch + 1}{total}", f"step {trainer.global_step}"]
        monitor = getattr(pl_module, "monitor", None)
        for key in ("train/loss", monitor):
            if key and key in metrics:
                parts.append(f"{key} {float(metrics[key]):.4g}")
        parts.append(f"{time.perf_counter() - self.start:.0f}s")
        print(" ".join(parts), file=self.stream or sys.stdout, flush=True)


class ValidateAtMaxSteps(pl.Callback):
    """Validate (and so checkpoint) on the last step of a ``trainer.max_steps`` run.

    Lightning validates when training is stopped through ``trainer.should_stop`` (early stopping,
    the ``max_time`` timer) but not when ``max_steps`` ends it mid-epoch; the best checkpoint that
    test then loads could be up to an epoch older than the final weights. Raising ``should_stop``
    on the last step makes Lightning run its end-of-training validation there too, in an epoch
    that validates at all (``check_val_every_n_epoch`` still decides; a run with no best
    checkpoint says so in results.json, ``metrics.test_checkpoint``).
    """

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int) -> None:
        if trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True


class SaveOnInterrupt(pl.Callback):
    """On SIGTERM (Lightning stops at the end of the current step), save ``last.ckpt`` first.

    SIGKILL cannot be caught: such a run resumes from the last periodic (``checkpoint_every``) or
    validation checkpoint.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException) and trainer.state.fn == "fit":
            trainer.save_checkpoint(self.path)
            if trainer.is_global_zero:
                print(f"interrupted at step {trainer.global_step}; saved {self.path}; "
                      "run the same command with ckpt_path=last to resume", file=sys.stderr)
