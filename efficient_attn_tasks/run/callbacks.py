"""The app's own Lightning callbacks and console settings: training throughput, the non-finite guard, save on
Ctrl-C or SIGTERM, one line per epoch, the learning curves, quiet info lines; what the optional callbacks
(configs/callbacks/) need from the app.

Imported by :func:`efficient_attn_tasks.run.fit.run` only when a run starts (it loads Lightning), never
by ``--help`` or the config checks.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks.early_stopping import EarlyStopping, EarlyStoppingReason
from pytorch_lightning.utilities.exceptions import SIGTERMException

from efficient_attn_tasks.run.distributed import all_gather_stack, world_size

# Lightning's info lines ("GPU available: ...", "TPU available: ...", "💡 Tip: ...", "`Trainer.fit` stopped")
# go through these loggers at INFO; warnings and errors still show.
QUIET_LOGGERS = ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.seed",
                 "lightning.pytorch.utilities.rank_zero", "lightning_fabric.utilities.rank_zero",
                 "lightning.fabric.utilities.rank_zero")


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

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True


class LastAtValidation(pl.Callback):
    """``last.ckpt`` after every validation of a fit, so ``ckpt_path=last`` resumes from the latest validated step:
    Lightning's ``save_last`` writes it only at a step where a top-k checkpoint was saved, which leaves it at
    the best step (thousands of steps back on a plateau) once the metric stops improving."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        trainer.save_checkpoint(self.path)


class SaveOnInterrupt(pl.Callback):
    """On Ctrl-C (SIGINT) or SIGTERM, stop at the end of the current step (or validation batch) and save
    ``last.ckpt`` there; ``saved_step`` is then that step. The caller writes the interrupted record and says how
    to resume (efficient_attn_tasks/run/fit.py).

    SIGTERM is Lightning's (its SIGTERMException). SIGINT: during fit this callback's handler only asks for the
    stop (a checkpoint saved mid-step would not match its data position); the step then ends with a
    KeyboardInterrupt that Lightning hands to ``on_exception``. A second Ctrl-C interrupts at once (Python's
    default handler is back), still saving. SIGKILL cannot be caught: such a run resumes from the last periodic
    (``checkpoint_every``) or validation checkpoint.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.saved_step: int | None = None
        self._requested = False
        self._previous: Any = None  # the SIGINT handler before fit; None when this callback installed none

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._requested = False
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        self._requested = True
        self._restore()

    def _restore(self) -> None:
        if self._previous is not None and signal.getsignal(signal.SIGINT) == self._on_sigint:
            signal.signal(signal.SIGINT, self._previous)
        self._previous = None

    def _stop_if_requested(self, trainer: pl.Trainer) -> None:
        requested = self._requested
        if world_size() > 1:  # every process stops at the same step, as with Lightning's SIGTERM
            flag = torch.tensor([float(requested)], device=trainer.strategy.root_device)
            requested = bool(all_gather_stack(flag).max() > 0)
        if requested:
            raise KeyboardInterrupt

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._stop_if_requested(trainer)

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if trainer.state.fn == "fit" and world_size() == 1:  # DDP: processes may differ in validation batches
            self._stop_if_requested(trainer)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore()
        if isinstance(exception, (SIGTERMException, KeyboardInterrupt)) and trainer.state.fn == "fit":
            trainer.save_checkpoint(self.path)
            self.saved_step = trainer.global_step


class CurveLog(pl.Callback):
    """The run's learning curves, whatever the logger (W&B offline, CSV, none): ``(step, key, value)`` rows.

    Training: every ``trainer.log_every_n_steps`` optimizer steps (and at the last one), ``train/loss`` as
    the mean of the values logged since the previous row and ``train/lr`` as logged at that step (the rate
    the step used). Validation (not the sanity check): every ``val/`` metric at the step it ran. The rows
    are kept in checkpoints, so a resumed run's curves start at its first step; ``run()`` writes them as
    ``curves.csv`` and draws ``curves.png`` (efficient_attn_tasks/run/curves.py).
    """

    def __init__(self) -> None:
        self.rows: list[tuple[int, str, float]] = []
        self._loss_sum: torch.Tensor | float = 0.0  # summed on the device: no synchronisation per step
        self._loss_count = 0
        self._last_step = 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        metrics = trainer.callback_metrics
        if "train/loss" in metrics:
            self._loss_sum = self._loss_sum + metrics["train/loss"].detach()
            self._loss_count += 1
        step = trainer.global_step
        if step != self._last_step and step % max(1, trainer.log_every_n_steps) == 0:
            self._flush(step, metrics)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step != self._last_step:
            self._flush(trainer.global_step, trainer.callback_metrics)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        step = trainer.global_step
        self.rows = [r for r in self.rows if not (r[0] == step and r[1].startswith("val/"))]  # one validation per step
        self.rows += [(step, k, float(v)) for k, v in sorted(trainer.callback_metrics.items()) if k.startswith("val/")]

    def _flush(self, step: int, metrics: dict[str, Any]) -> None:
        if self._loss_count:
            self.rows.append((step, "train/loss", float(self._loss_sum) / self._loss_count))
        if "train/lr" in metrics:
            self.rows.append((step, "train/lr", float(metrics["train/lr"])))
        self._loss_sum, self._loss_count, self._last_step = 0.0, 0, step

    def state_dict(self) -> dict[str, Any]:
        return {"rows": [list(r) for r in self.rows], "loss_sum": float(self._loss_sum), "loss_count": self._loss_count,
                "last_step": self._last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows = [(int(s), str(k), float(v)) for s, k, v in state["rows"]]
        self._loss_sum, self._loss_count, self._last_step = state["loss_sum"], state["loss_count"], state["last_step"]


def keep_averaged_weights_for_test(callbacks: list[pl.Callback]) -> None:
    """Before ``trainer.test(ckpt_path=...)``: make Lightning's weight averaging (``callbacks=ema``) test the
    averaged weights.

    Its checkpoints hold the averaged weights as ``state_dict`` (what validation scored and the best
    checkpoint was chosen by; what efficient-attn-eval loads) and the raw ones as ``current_model_state``.
    Loading a checkpoint while its averaged model exists, as after ``fit``, puts the raw weights back: the
    test would score weights nobody validated. Without the averaged model the checkpoint's ``state_dict``
    stays (Lightning's note that its state is not restored outside fit is silenced: nothing is lost).
    """
    from pytorch_lightning.callbacks import WeightAveraging

    for callback in callbacks:
        if isinstance(callback, WeightAveraging):
            callback._average_model = None  # Lightning's attribute: None = not fitting, no weights to restore
    warnings.filterwarnings("ignore",
                            message="You're using the WeightAveraging callback, but loading a checkpoint outside")


class Throughput(pl.Callback):
    """Training tokens per second (forward + backward + optimiser time only) over all processes.

    Global: each step adds every process's tokens, and the step's time on the slowest process (DDP
    keeps them in step), so ``tokens_per_s`` is what the whole run trained per second of training,
    and the saved state is the same on every process (a resumed run continues it).
    """

    def __init__(self) -> None:
        self.tokens, self.seconds, self._start = 0, 0.0, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        seconds = time.perf_counter() - self._start
        tokens = int(pl_module.batch_tokens(batch))
        if world_size() > 1:  # (world, 2): every process's tokens and seconds of this step
            every = all_gather_stack(torch.tensor([tokens, seconds], dtype=torch.float64, device=pl_module.device))
            tokens, seconds = int(every[:, 0].sum()), float(every[:, 1].max())
        self.tokens += tokens
        self.seconds += seconds
        if self.seconds > 0:
            pl_module.log("train/tokens_per_s", self.tokens / self.seconds, on_step=True, on_epoch=False)

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens / self.seconds if self.seconds > 0 else None

    def state_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "seconds": self.seconds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tokens, self.seconds = state["tokens"], state["seconds"]


class WallClock(pl.Callback):
    """The run's wall seconds across attempts: each checkpoint carries the seconds up to its save, and an attempt
    resumed from it counts on from there (``attempt.wall_s``). What a stopped attempt ran after its last
    checkpoint is run again, so it is counted once. Only fit restores the clock: ``test(ckpt_path)`` loads the
    best checkpoint's callback states too, which would count this attempt's seconds twice."""

    def __init__(self, attempt: Any) -> None:
        self.attempt, self._restore = attempt, False

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._restore = stage == "fit"

    def state_dict(self) -> dict[str, Any]:
        return {"seconds": self.attempt.wall_s}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self._restore:
            self.attempt.before = float(state["seconds"])


class NonFiniteGuard(pl.Callback):
    """Stops the run (or skips the update) when a training step yields a NaN/Inf loss or gradient.

    Checked after backward, before the optimizer step: ``policy="stop"`` raises with the step and the
    attention; ``policy="skip"`` drops that update (gradients cleared) and counts it. Under fp16 AMP,
    non-finite gradients from a finite loss are the gradient scaler's overflow (it skips the step and lowers
    its scale): those steps are only counted (``scaler_skipped``); a non-finite loss is always an incident.
    """

    def __init__(self, policy: str, attention: str) -> None:
        if policy not in ("stop", "skip"):
            raise ValueError(f"nonfinite must be 'stop' or 'skip', got {policy!r}")
        self.policy, self.attention, self.skipped, self.scaler_skipped = policy, attention, 0, 0
        self._nonfinite_loss = False  # any micro-batch since the last optimizer step

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        # The loss Lightning backpropagates: times the scaler's scale under fp16 AMP (a finite loss
        # stays finite unless loss × scale exceeds float32's 3.4e38; the scale starts at 65536).
        if not bool(torch.isfinite(loss).all()):
            self._nonfinite_loss = True

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        nonfinite_loss, self._nonfinite_loss = self._nonfinite_loss, False
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        finite_grads = not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
        if finite_grads and not nonfinite_loss:
            return
        if not nonfinite_loss and grad_scaler(trainer) is not None:  # fp16 overflow: the scaler skips this step
            self.scaler_skipped += 1
            pl_module.log("train/scaler_skipped_steps", float(self.scaler_skipped))
            return
        if self.policy == "stop":
            raise FloatingPointError(
                f"non-finite loss or gradient at step {trainer.global_step} with attention {self.attention!r}; "
                "lower optim.lr, train in precision=32-true, or set nonfinite=skip to drop such updates"
            )
        optimizer.zero_grad(set_to_none=True)
        self.skipped += 1
        pl_module.log("train/skipped_updates", float(self.skipped))

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "scaler_skipped": self.scaler_skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped = state["skipped"]
        self.scaler_skipped = state.get("scaler_skipped", 0)  # a checkpoint without the count


class ArmedEarlyStopping(EarlyStopping):
    """Lightning's EarlyStopping whose patience counts only once the monitored metric has reached ``arm_at``
    (at or above it for mode max, at or below for min): a run on a plateau before a late transition (MQAR's
    1/KV floor, where a run can sit for thousands of steps and then learn) is never stopped there, only one
    that has learned and stopped improving. ``arm_at`` None: plain EarlyStopping."""

    def __init__(self, monitor: str | None = None, mode: str = "min", arm_at: float | None = None,
                 **kwargs: Any) -> None:  # monitor and mode named: the run fills them from the task's metric
        super().__init__(monitor=monitor, mode=mode, **kwargs)
        self.arm_at = arm_at

    def _evaluate_stopping_criteria(self, current: torch.Tensor) -> tuple[bool, str | None]:
        should_stop, reason = super()._evaluate_stopping_criteria(current)
        best = float(self.best_score)
        armed = self.arm_at is None or (best >= self.arm_at if self.mode == "max" else best <= self.arm_at)
        if should_stop and not armed and self.stopping_reason == EarlyStoppingReason.PATIENCE_EXHAUSTED:
            self.wait_count, self.stopping_reason, should_stop = 0, EarlyStoppingReason.NOT_STOPPED, False
            reason = f"{self.monitor} has not reached {self.arm_at}: early stopping not armed"
        return should_stop, reason


def check_at_validation(callbacks: list[pl.Callback]) -> list[pl.Callback]:
    """``callbacks``, each EarlyStopping left to Lightning's choice (``check_on_train_epoch_end`` unset) set to
    check after each validation only. Lightning's default with one validation per epoch checks at the epoch's end
    instead, and a run resumed from a checkpoint saved at an epoch's end replays that hook before any validation
    has run in the new process, where the check raises for want of the metric."""
    for callback in callbacks:
        if isinstance(callback, EarlyStopping) and callback._check_on_train_epoch_end is None:
            callback._check_on_train_epoch_end = False
    return callbacks


def early_stopping_outcome(callbacks: list[pl.Callback]) -> tuple[bool, bool]:
    """(whether an EarlyStopping callback ran, whether one stopped the run because its metric stopped
    improving: patience exhausted or ``stopping_threshold`` reached; a stop on divergence or a non-finite
    metric is not that). Read after fit and before test (test restores the best checkpoint's callback states)."""
    stops = [c for c in callbacks if isinstance(c, EarlyStopping)]
    converged = False
    for stop in stops:
        reason = getattr(stop, "stopping_reason", None)  # Lightning >= 2.6
        if reason is not None:
            converged |= reason.name in ("PATIENCE_EXHAUSTED", "STOPPING_THRESHOLD")
        else:
            converged |= stop.stopped_epoch > 0 and stop.wait_count >= stop.patience
    return bool(stops), converged


def grad_scaler(trainer: pl.Trainer) -> Any:
    """The gradient scaler of the trainer's precision plugin (fp16 AMP), or None."""
    return getattr(trainer.precision_plugin, "scaler", None)
