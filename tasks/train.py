"""``efficient-attn-train``: the Hydra app that trains one task with one attention and records the run.

    efficient-attn-train task=translation attention=favor_plus
    efficient-attn-train -m experiment=quickstart attention=softmax,favor_plus seed=0,1,2

Each run's output dir holds the resolved config (.hydra/), checkpoints/ and results.json.
``--help`` (or no arguments) prints configs/train.yaml's ``hydra.help.template``. Importing this module
loads neither torch nor Lightning: the config checks need torch only (tasks/schema.py), and
Lightning, W&B and the task's code load when a run starts.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import importlib
import importlib.util
import inspect
import json
import os
import platform
import resource
import shutil
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .data import DataError

if TYPE_CHECKING:
    import pytorch_lightning as pl

    from efficient_attn.transformer import AttentionSpec

# Start-up stays light: --help, the config checks and their errors load neither Lightning nor W&B
# nor sacreBLEU (tests/test_cli.py); run() imports them when a run starts.
TASKS = {"translation": "tasks.translation", "listops": "tasks.listops", "lm": "tasks.lm", "mqar": "tasks.mqar"}
TOP_LEVEL = {"seed", "name", "row", "data_dir", "cache_dir", "ckpt_path", "checkpoint_every", "test", "threads", "nonfinite",
             "optim", "task", "attention", "model", "trainer", "logger", "callbacks"}
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")
LOGGER_KEYS = {  # tasks/loggers.py builds them
    "wandb": {"kind", "project", "entity", "mode", "init_timeout", "log_model"},
    "csv": {"kind"},
    "none": {"kind"},
}


class ConfigError(ValueError):
    """A config that cannot run; the message names the key and what to do."""


APP_TRAINER_ARGUMENTS = {  # pl.Trainer arguments run() passes itself: a trainer.* value would clash with them
    "callbacks": "the app adds its own (checkpoints, throughput, non-finite guard); from Python, pass yours as "
                 "tasks.train.run(cfg, out_dir, callbacks=[...])",
    "logger": "choose the logger group instead: logger=wandb, logger=csv or logger=none",
    "default_root_dir": "the run dir is hydra.run.dir (hydra.sweep.dir with -m); set that instead",
}
REFUSED_TRAINER_VALUES = {  # values that switch off what the app relies on: Lightning refuses them mid-start
    "enable_checkpointing": (False, "the app always checkpoints (best by the task's metric, and last) and tests "
                                    "the best; remove trainer.enable_checkpointing"),
    "barebones": (True, "barebones disables the checkpoints and logging the app records; remove trainer.barebones"),
}

COSINE_HORIZON = ("optim.schedule=cosine needs a finite horizon: set trainer.max_steps (trainer.max_time with "
                  "trainer.max_epochs=-1 gives no step count to decay over), or a finite trainer.max_epochs, "
                  "or choose optim.schedule=inverse_sqrt or constant")


def has_step_horizon(trainer: Any) -> bool:
    """Whether the run's length in steps is known before it starts: ``max_steps``, ``fast_dev_run``, or a
    finite epoch count (``max_epochs`` unset means 1000 epochs unless ``max_time`` is set, then none,
    as Lightning's ``_parse_loop_limits``; -1 means none)."""
    if trainer.get("max_steps", -1) not in (None, -1) or trainer.get("fast_dev_run"):
        return True
    epochs = trainer.get("max_epochs")
    return trainer.get("max_time") is None if epochs is None else epochs != -1


def check_trainer(trainer: Any) -> None:
    """Refuse the trainer keys the app sets itself (``callbacks``, ``logger``, ``default_root_dir``: Lightning
    would stop with "got multiple values") and values that switch off its checkpointing."""
    clash = sorted(set(trainer.keys()) & set(APP_TRAINER_ARGUMENTS))
    if clash:
        raise ConfigError(f"trainer.{clash[0]} is set by the app; remove it: {APP_TRAINER_ARGUMENTS[clash[0]]}")
    for key, (refused, fix) in REFUSED_TRAINER_VALUES.items():
        if trainer.get(key) is not None and bool(trainer.get(key)) == refused:
            raise ConfigError(f"trainer.{key}={trainer.get(key)}: {fix}")


def check_max_len(cfg: DictConfig, task: Any) -> None:
    """Fill ``model.max_len: null`` from the task (its ``default_max_len``, else its ``longest_sequence``:
    ListOps max_length - 1, lm context_length, mqar seq_len), so every task runs with every model group's
    default; refuse at start, not after the data is built, an explicit model.max_len below a length the
    task's config fixes. Translation's config fixes none: its pairs are checked once tokenised."""
    need = getattr(task, "longest_sequence", None)
    max_len = cfg.model.get("max_len")
    if max_len is None:
        cfg.model.max_len = getattr(task, "default_max_len", need)  # cosformer's ${model.max_len}, results.json
        return
    if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 1:
        raise ConfigError(f"model.max_len must be a positive int or null (from the task), got {max_len!r}")
    if need is not None and max_len < need:
        raise ConfigError(f"task {cfg.task.name}: sequences reach {need} tokens ({task.longest_from}) but "
                          f"model.max_len={max_len}; raise model.max_len to >= {need} or set it to null (the task's "
                          "longest sequence), or shorten the task's sequences")


def check_schedule(optim: Any, trainer: Any) -> None:
    """The cosine schedule decays over the run's step count: refuse at start a run that has none."""
    if optim.get("schedule") == "cosine" and not has_step_horizon(trainer):
        raise ConfigError(COSINE_HORIZON)


# ----------------------------------------------------------------------------- strict checks
def check_config(cfg: DictConfig) -> Any:
    """Validate every section against its schema; return the task's module.

    Everything is checked before the task's module (Lightning, its data code) is imported: a wrong
    top-level, task, optim, attention, trainer or logger key fails before torch loads, a wrong model
    or attention choice in about the time torch takes to import, a wrong callback (its class is
    imported to read its arguments) in about the time Lightning takes.
    """
    from . import schema

    _known(set(cfg.keys()), TOP_LEVEL, "")
    if cfg.task.get("name") not in TASKS:
        raise ConfigError(f"unknown task {cfg.task.get('name')!r}; choose one of {sorted(TASKS)}")
    # the sections whose schemas need no torch first, so their typos are reported fastest; the task and
    # optim sections are built as their dataclasses, so their value checks (__post_init__) run here too
    task = _validated(cfg.task, schema.TASK_SCHEMAS[cfg.task.name], "task", f"task.{cfg.task.name}: ")
    _validated(cfg.optim, schema.OptimConfig, "optim")
    check_max_len(cfg, task)
    _check_section(cfg.attention, schema.AttentionConfig, "attention")
    _known(set(cfg.trainer.keys()), trainer_arguments(), "trainer.")
    check_trainer(cfg.trainer)
    check_schedule(cfg.optim, cfg.trainer)
    if cfg.logger.get("kind") not in LOGGER_KEYS:
        raise ConfigError(f"logger.kind must be one of {sorted(LOGGER_KEYS)}, got {cfg.logger.get('kind')!r}")
    _known(set(cfg.logger.keys()), LOGGER_KEYS[cfg.logger.kind], "logger.")
    if cfg.nonfinite not in ("stop", "skip"):
        raise ConfigError(f"nonfinite must be 'stop' or 'skip', got {cfg.nonfinite!r}")
    from efficient_attn.transformer import AttentionSpec  # torch loads here

    from .schema import TASK_SITES, AttentionConfig, ModelConfig, attention_spec, transformer_config

    _check_section(cfg.model, ModelConfig, "model")
    try:
        transformer_config(cfg)
        for site in ("encoder", "decoder", "cross"):
            chosen = cfg.model.get(f"{site}_attention") or cfg.attention
            _check_section(chosen, AttentionConfig, f"model.{site}_attention")
            if "causal" in (chosen.kwargs or {}):
                raise ConfigError(f"{site} attention: causal is not an attention option; the model sets it per site "
                                  "(decoder self-attention is causal, encoder and cross-attention are not); remove it")
            if chosen.get("layers") is None:  # a hybrid's name is a label; its layers are checked below
                AttentionSpec(chosen.name, dict(chosen.kwargs or {})).check(f"{site} attention")
            if site in TASK_SITES[cfg.task.name]:  # the task's model has this site: the attention must serve it
                try:
                    specs = attention_spec(cfg, site)  # one spec, or one per layer (hybrids, model.layer_attentions)
                except ValueError as err:
                    raise ConfigError(f"task {cfg.task.name}: {err}") from None
                _check_site(cfg.task.name, site, specs)
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err)) from None
    check_callbacks(cfg.get("callbacks"), cfg.logger.kind)  # Lightning loads here when callbacks are set
    return importlib.import_module(TASKS[cfg.task.name])  # Lightning and the task's code load here


HYDRA_KEYS = {"_target_", "_args_", "_partial_", "_recursive_", "_convert_"}  # hydra.utils.instantiate's own


def check_callbacks(callbacks: DictConfig | None, logger_kind: str) -> None:
    """The ``callbacks`` group (configs/callbacks/): each entry a ``{_target_: <Lightning callback class>,
    <its arguments>}``; an entry without ``_target_``, a class that cannot be imported or is no callback, an
    argument its ``__init__`` does not take or a required one missing is a ConfigError naming the key.
    ``monitor: null`` with ``mode: null`` stands for the task's validation metric and its direction (see
    :func:`optional_callbacks`); one without the other is refused, so a loss is never maximised."""
    if not callbacks:
        return
    if not isinstance(callbacks, DictConfig):
        raise ConfigError(f"callbacks must be a mapping of named callbacks, got {callbacks!r}; "
                          "choose a file: callbacks=early_stopping (configs/callbacks/)")
    import pytorch_lightning as pl
    from hydra.utils import get_class

    known = sorted(p.stem for p in (Path(CONFIG_DIR) / "callbacks").glob("*.yaml"))
    for name, entry in callbacks.items():
        where = f"callbacks.{name}"
        if not isinstance(entry, DictConfig) or "_target_" not in entry:
            close = difflib.get_close_matches(str(name), known, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise ConfigError(f"{where} has no _target_; {hint}choose callbacks=<file> from {known} "
                              f"(configs/callbacks/), or give {where}._target_=<Lightning callback class>")
        try:
            cls = get_class(str(entry._target_))
        except Exception as err:  # noqa: BLE001 - Hydra's ImportError/ValueError, several lines long
            reason = str(err).splitlines()[0]
            raise ConfigError(f"{where}._target_: cannot import {entry._target_!r} ({reason})") from None
        if not issubclass(cls, pl.Callback):
            raise ConfigError(f"{where}._target_: {entry._target_} is not a Lightning callback")
        named = _check_arguments(cls, set(entry.keys()) - HYDRA_KEYS, where)
        if "monitor" in entry and "mode" in named and (entry.monitor is None) != (entry.get("mode") is None):
            raise ConfigError(f"{where}: give monitor and mode together ({where}.mode=min or max with "
                              f"{where}.monitor={entry.monitor}), or both null for the task's validation metric")
        if logger_kind == "none" and issubclass(cls, pl.callbacks.LearningRateMonitor):
            raise ConfigError(f"{where}: LearningRateMonitor logs to a logger; set logger=csv or wandb, "
                              "or drop it (the module logs train/lr every step)")


def _check_arguments(cls: type, given: set[str], where: str) -> set[str]:
    """``given`` are keyword arguments of ``cls.__init__`` (anything goes if it takes ``**kwargs``) and
    cover its required ones; returns the names it takes."""
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if not any(p.kind == p.VAR_KEYWORD for p in params):
        _known(given, named, f"{where}.")
    required = [p.name for p in params if p.default is p.empty and p.name in named and p.name not in given]
    if required:
        raise ConfigError(f"{where}: missing argument {required[0]} of {cls.__name__}; set {where}.{required[0]}")
    return named


@functools.lru_cache(maxsize=1)
def trainer_arguments() -> frozenset[str]:
    """``pytorch_lightning.Trainer``'s keyword arguments, read from its source without importing
    Lightning (seconds); the imported signature if the source cannot be read."""
    try:
        spec = importlib.util.find_spec("pytorch_lightning")
        source = Path(spec.origin).parent / "trainer" / "trainer.py"
        tree = ast.parse(source.read_text())
        cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Trainer")
        init = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
        names = {a.arg for a in (*init.args.args[1:], *init.args.kwonlyargs)}
        if names:
            return frozenset(names)
    except (AttributeError, OSError, SyntaxError, StopIteration, TypeError, ValueError):
        pass
    import pytorch_lightning as pl

    return frozenset(inspect.signature(pl.Trainer).parameters)


def _check_site(task: str, site: str, specs: AttentionSpec | list[AttentionSpec]) -> None:
    from efficient_attn.transformer import AttentionSpec

    """Every layer's attention exists, takes its options and can serve ``site``; errors name the layer."""
    if isinstance(specs, AttentionSpec):
        try:
            specs.check(f"{site} attention", site)
        except ValueError as err:
            raise ConfigError(f"task {task}: {err}; choose another attention for this site, "
                              f"e.g. ++model.{site}_attention={{name: softmax, kwargs: {{}}}}") from None
        return
    for i, spec in enumerate(specs):
        where = f"{site} attention, layer {i}"
        if "causal" in spec.kwargs:
            raise ConfigError(f"{where}: causal is not an attention option; the model sets it per site; remove it")
        try:
            spec.check(where, site)
        except ValueError as err:
            raise ConfigError(f"task {task}: {err}; choose another attention for that layer "
                              "(model.layer_attentions or the hybrid's attention.layers)") from None


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


def _validated(node: DictConfig, schema: type, name: str, prefix: str = "") -> Any:
    """The section's keys and types checked, then the section built as ``schema`` (as the task's code builds
    it later), so the schema's value checks run before any data or model is built; ``prefix`` starts the
    error when the schema's messages do not name the section."""
    _check_section(node, schema, name)
    try:
        return schema(**OmegaConf.to_container(node, resolve=True))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{prefix}{err}") from None


# ----------------------------------------------------------------------------- one run
def run(cfg: DictConfig, out_dir: Path, callbacks: Sequence[pl.Callback] = (),
        plugins: Sequence[Any] = ()) -> dict[str, Any]:
    """Train, test the best checkpoint, write results.json (``"status": "ok"``); returns the record.

    ``ckpt_path=last`` resumes from ``<out_dir>/checkpoints/last.ckpt`` (same W&B run id, same
    results.json); a run dir whose results.json says ok is not run again, one whose record says failed
    is. A run that raises (a config, data or non-finite error, any other exception) first writes its
    failed record (:func:`failed_record`), so a sweep shows which job failed, where and why.
    The ``callbacks`` group's entries (configs/callbacks/) and then ``callbacks`` (e.g. by tests) are
    added to the app's own (checkpointing, throughput, the learning curves: ``curves.csv``,
    ``curves.png``); ``plugins`` go to the Trainer, e.g. fp16 AMP with a gradient scaler on CPU (with
    ``trainer.precision=null``), which ``trainer.precision=16-mixed`` turns into bf16 there.
    """
    attempt = Attempt(time.perf_counter())
    try:
        return _train(cfg, out_dir, callbacks, plugins, attempt)
    except Exception as err:
        write_failed_record(cfg, out_dir, err, attempt)
        raise


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


def _train(cfg: DictConfig, out_dir: Path, callbacks: Sequence[pl.Callback], plugins: Sequence[Any],
           attempt: Attempt) -> dict[str, Any]:
    start = attempt.start
    task = check_config(cfg)
    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.callbacks import ModelCheckpoint

    from .base import NonFiniteGuard, Throughput, attention_label
    from .callbacks import (CurveLog, EpochLine, SaveOnInterrupt, ValidateAtMaxSteps, keep_averaged_weights_for_test,
                            progress_bar, quiet_lightning)
    from .loggers import finish_wandb, make_logger, wandb_offline_note

    quiet_lightning()
    ckpt_path = resume_checkpoint(cfg.ckpt_path, out_dir)
    if ckpt_path == "done":
        record = json.loads((out_dir / "results.json").read_text())
        print(f"{out_dir} already finished (results.json); nothing to resume")
        return record
    attempt.resumed_from = ckpt_path
    threads = default_threads(cfg.threads, joblib_n_jobs(), os.cpu_count() or 1)
    if threads:
        torch.set_num_threads(threads)
    # Our loaders resume mid-epoch through the module's saved data position (tasks/sampling.py).
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
    # Lightning's own use of a torch API that torch deprecated; nothing a user can act on.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    # DDP: every process logs the whole split's val/test metrics (it evaluates the whole split, or translation
    # gathers every process's share), so Lightning's advice to average them over the processes does not apply.
    warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\('(val|test)/")
    pl.seed_everything(cfg.seed, workers=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    if record_status(out_dir / "results.json") == "failed":  # an earlier attempt's: this one runs it again
        (out_dir / "results.json").unlink(missing_ok=True)
    reset_peak_memory()
    try:
        try:
            datamodule, module = task.build(cfg)
        except ConfigError:
            raise
        except ValueError as err:  # a task config value its checks reject (e.g. impossible ListOps lengths)
            raise ConfigError(f"task.{cfg.task.name}: {err}") from None
        logger = make_logger(cfg, out_dir)
        checkpoints = out_dir / "checkpoints"
        best = ModelCheckpoint(dirpath=checkpoints, monitor=module.monitor, mode=module.monitor_mode, save_last=True,
                               filename="best-{step}")
        throughput, guard, curves = Throughput(), NonFiniteGuard(cfg.nonfinite, attention_label(cfg)), CurveLog()
        own = [best, throughput, guard, SaveOnInterrupt(checkpoints / "last.ckpt"), ValidateAtMaxSteps(), curves]
        if cfg.checkpoint_every:
            own.append(ModelCheckpoint(dirpath=checkpoints, every_n_train_steps=int(cfg.checkpoint_every),
                                       save_top_k=0, save_last=True))
        trainer_args = OmegaConf.to_container(cfg.trainer, resolve=True)
        trainer_args["enable_progress_bar"] = progress_bar(trainer_args.get("enable_progress_bar"))
        if not trainer_args["enable_progress_bar"]:
            own.append(EpochLine())
        if plugins:
            trainer_args["plugins"] = [*(trainer_args.get("plugins") or []), *plugins]
        optional = optional_callbacks(cfg.get("callbacks"), module.monitor, module.monitor_mode)
        trainer = pl.Trainer(**trainer_args, default_root_dir=str(out_dir), logger=logger,
                             callbacks=[*own, *optional, *callbacks])
        attempt.trainer = trainer
        if logger:
            logger.log_hyperparams({"num_parameters": module.num_parameters()})
        fit_start = time.perf_counter()
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        fit_s = time.perf_counter() - fit_start
        val = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}  # before test
        test, tested = {}, None
        if cfg.test:
            tested = tested_checkpoint(best.best_model_path, trainer.global_step, trainer.is_global_zero)
            keep_averaged_weights_for_test(trainer.callbacks)
            fit_states = [(c, c.state_dict()) for c in (throughput, guard, curves)]
            test = trainer.test(module, datamodule=datamodule, ckpt_path=tested["path"], verbose=False)[0]
            for c, state in fit_states:  # test(ckpt_path) loaded the best checkpoint's callback states: the whole run's
                c.load_state_dict(state)
        record = _record(cfg, module, trainer, best, throughput, val, test, fit_s, time.perf_counter() - start)
        record["metrics"]["test_checkpoint"] = tested
        record["skipped_updates"] = guard.skipped
        record["scaler_skipped_steps"] = guard.scaler_skipped  # fp16 AMP overflow steps the scaler skipped (normal)
        record["precision"] = str(trainer.precision)  # as Lightning ran it (16-mixed on CPU becomes bf16-mixed)
        record["resumed_from"] = str(ckpt_path) if ckpt_path else None
        record["threads"] = torch.get_num_threads()
        if trainer.is_global_zero:
            (out_dir / "results.json").write_text(json.dumps(record, indent=2) + "\n")
            if getattr(module, "test_hypotheses", None):
                (out_dir / "test_hypotheses.txt").write_text("\n".join(module.test_hypotheses) + "\n")
            draw_curves(curves.rows, out_dir, module.monitor, f"{record['task']} / {record['attention_config']}")
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
    """``curves.csv`` and ``curves.png`` in the run dir (tasks/curves.py); a failure is a warning line, never
    the run's: its results are written by then."""
    from .curves import CURVES_PNG, plot_run, read_curves, write_curves

    try:
        plot_run(read_curves(write_curves(rows, out_dir)), monitor, out_dir / CURVES_PNG, title)
    except Exception as err:  # noqa: BLE001 - matplotlib, fonts, disk: any of them
        print(f"warning: learning curves not drawn ({type(err).__name__}: {err}); results.json is complete",
              file=sys.stderr)


def default_threads(threads: int | None, n_jobs: int | None, cpus: int) -> int | None:
    """Torch threads for one run: ``threads`` when set; for a job of a joblib multirun (``n_jobs`` = the
    launcher's n_jobs, None when not under joblib) that runs k > 1 jobs at once, max(1, cpus // k), so
    the jobs share the cores instead of each starting one thread per core; else None (torch's default).
    A negative n_jobs counts back from the CPU count (-1: all of them), as in joblib."""
    if threads:
        return int(threads)
    if n_jobs is None:
        return None
    at_once = cpus + 1 + n_jobs if n_jobs < 0 else n_jobs
    return max(1, cpus // at_once) if at_once > 1 else None


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


def resume_checkpoint(ckpt_path: str | None, out_dir: Path) -> str | None:
    """``last`` -> this run dir's last.ckpt (None if it has none yet, "done" if the run finished: its
    results.json says ok; a failed run is run again, from its last.ckpt if it has one)."""
    if ckpt_path != "last":
        if ckpt_path and not Path(ckpt_path).is_file():
            raise ConfigError(f"ckpt_path={ckpt_path} is not a file; give a .ckpt file or ckpt_path=last")
        return ckpt_path
    if record_status(out_dir / "results.json") == "ok":
        return "done"
    last = out_dir / "checkpoints" / "last.ckpt"
    if last.is_file():
        print(f"resuming from {last}")
        return str(last)
    print(f"ckpt_path=last: no checkpoint in {out_dir} yet; starting from the beginning")
    return None


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


def _record(cfg, module, trainer, checkpoint, throughput, val, test, fit_s, wall_s) -> dict[str, Any]:
    from .base import attention_label
    from .schema import attention_config

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
    from . import schema

    try:
        attention = schema.attention_label(cfg)
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


SWEEP_FAILED_EXIT = 1  # a multirun in which a job failed (or left no results.json) ends with this exit code


class RunSummary(Callback):
    """Hydra callback (configs/train.yaml, every multirun): print a compact table (tasks/summary.py): per
    attention config its main metric (mean ± 95% CI over seeds), speed, memory and time, in launch order,
    failed jobs listed with their run dir and error, then the ``efficient-attn-report`` command for the full
    table; then exit with ``SWEEP_FAILED_EXIT`` if a job failed, so a script sees it (the jobs themselves
    return, for the sweep to go on: ``_app``)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from .summary import summarize

        text, failed = summarize(config.hydra.sweep.dir)
        print("\n" + text)
        if failed:
            print(f"error: {failed} job(s) of the sweep failed (listed above); exit code {SWEEP_FAILED_EXIT}",
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
    except SystemExit as err:
        if type(err).__name__ == "SIGTERMException":  # Lightning's, raised at the end of the step after SIGTERM
            sys.exit(143)  # 128 + SIGTERM; last.ckpt was saved
        raise
    except Exception:  # a bug or e.g. out of memory: the traceback, and in a sweep the next job
        if not sweep:
            raise
        traceback.print_exc()
        print(f"job {out_dir} failed (results.json status failed); the sweep goes on", file=sys.stderr)


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
    """What a run dir holds before its run writes anything: Hydra's files, or the failed record of that run."""
    return entry.name == ".hydra" or (entry.suffix == ".log" and entry.is_file()) or \
        (entry.name == "results.json" and record_status(entry) == "failed")


def main() -> None:
    """``efficient-attn-train``: no arguments prints the help (a bare run would start a long ListOps
    training); ``ckpt_path=last`` without a run dir continues this command's latest run."""
    if not sys.argv[1:]:
        sys.argv.append("--help")
    try:
        sys.argv[1:] = resume_argv(sys.argv[1:], Path.cwd() / "outputs")
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    _app()


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


if __name__ == "__main__":  # python -m tasks.train: run the importable module's app, not this __main__ copy's,
    from tasks import train  # as joblib's workers unpickle the Hydra task function by its module's name

    train.main()
