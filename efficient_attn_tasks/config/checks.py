"""The config checks of ``efficient-attn-train``: :func:`check_config` and every helper it uses.

Each section (top level, optim, attention, trainer, logger, nonfinite, task, model, callbacks) is checked
against its schema before any data or model is built, so a wrong key or value is one :class:`ConfigError`
line naming the key and the fix. Importing this module loads neither torch nor Lightning: the top-level,
optim, trainer and logger sections are checked first, then the task's module is found in the task
registry (efficient_attn_tasks/tasks/__init__.py) and imported (torch and Lightning load), which checks its
``task:`` section, the model and the attentions; Lightning callbacks are imported only when set.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import importlib.util
import inspect
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from efficient_attn_tasks import config_dir
from efficient_attn_tasks.config.labels import drop_stale_config
from efficient_attn_tasks.config.schema import SITES, AttentionConfig, OptimConfig, check_attentions, transformer_config
from efficient_attn_tasks.tasks import task_module

# Start-up stays light: --help and the checks of the top-level, optim, trainer and logger sections load
# neither torch nor Lightning (tests/test_cli_train.py); the task's module loads them, W&B loads when a run starts.
TOP_LEVEL = {"seed", "name", "row", "data_dir", "cache_dir", "ckpt_path", "init_from", "transfer_steps",
             "transfer_lr", "validate_first", "overwrite", "checkpoint_every",
             "test", "threads", "nonfinite", "imports", "optim", "task", "attention", "model", "trainer", "logger",
             "callbacks"}
CONFIG_DIR = str(config_dir())
LOGGER_KEYS = {  # efficient_attn_tasks/run/loggers.py builds them
    "wandb": {"kind", "project", "entity", "mode", "init_timeout", "log_model"},
    "csv": {"kind"},
    "none": {"kind"},
}


class ConfigError(ValueError):
    """A config that cannot run; the message names the key and what to do."""


APP_TRAINER_ARGUMENTS = {  # pl.Trainer arguments run() passes itself: a trainer.* value would clash with them
    "callbacks": "the app adds its own (checkpoints, throughput, non-finite guard); from Python, pass yours as "
                 "efficient_attn_tasks.run.fit.run(cfg, out_dir, callbacks=[...])",
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
    if optim.get("schedule") == "cosine" and optim.get("total_steps") is None and not has_step_horizon(trainer):
        raise ConfigError(COSINE_HORIZON)


def check_config(cfg: DictConfig) -> Any:
    """Validate every section against its schema; return the task's module.

    The top-level, optim, attention (its keys), trainer and logger sections are checked before torch
    loads; then the ``imports`` (the user's attentions and tasks) and the task's module (found by
    ``task.name`` in the task registry; Lightning and its data code load), whose ``Config`` checks the
    ``task:`` section; then the model and every attention the task's model has, and the callbacks (a
    callback class is imported to read its arguments).
    """
    _known(set(cfg.keys()), TOP_LEVEL, "")
    # the sections whose schemas need no torch first, so their typos are reported fastest; optim is built
    # as its dataclass, so its value checks (__post_init__) run here too
    _validated(cfg.optim, OptimConfig, "optim")
    _check_section(cfg.attention, AttentionConfig, "attention")
    _known(set(cfg.trainer.keys()), trainer_arguments(), "trainer.")
    check_trainer(cfg.trainer)
    check_schedule(cfg.optim, cfg.trainer)
    if cfg.logger.get("kind") not in LOGGER_KEYS:
        raise ConfigError(f"logger.kind must be one of {sorted(LOGGER_KEYS)}, got {cfg.logger.get('kind')!r}")
    _known(set(cfg.logger.keys()), LOGGER_KEYS[cfg.logger.kind], "logger.")
    for key in ("test", "overwrite", "validate_first"):
        if not isinstance(cfg.get(key), bool):
            raise ConfigError(f"{key} must be true or false, got {cfg.get(key)!r}")
    if cfg.nonfinite not in ("stop", "skip"):
        raise ConfigError(f"nonfinite must be 'stop' or 'skip', got {cfg.nonfinite!r}")
    check_init_from(cfg.get("init_from"), cfg.get("ckpt_path"))
    check_transfer(cfg.get("transfer_steps", 0), cfg.get("transfer_lr"), cfg.get("init_from"))

    check_imports(cfg.get("imports"))  # before the task: an imported module may register it
    try:
        task = task_module(cfg.task.get("name"))  # torch, Lightning and the task's code load here
    except ValueError as err:
        raise ConfigError(str(err)) from None
    # the task section built as its Config (as the task's code builds it later): its value checks run here
    task_cfg = _validated(cfg.task, task.Config, "task", f"task.{cfg.task.name}: ")
    check_max_len(cfg, task_cfg)
    drop_stale_config(cfg)

    from efficient_attn_tasks.config.schema import ModelConfig  # built on torch's TransformerConfig

    _check_section(cfg.model, ModelConfig, "model")
    for site in SITES:
        section = cfg.model.get(f"{site}_attention") or cfg.attention
        if not isinstance(section, str):  # a config name is read and checked by attention_spec
            _check_section(section, AttentionConfig, f"model.{site}_attention")
    try:
        transformer_config(cfg)
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err)) from None
    try:
        check_attentions(cfg, task.ATTENTION_SITES)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"task {cfg.task.name}: {err}") from None
    check_callbacks(cfg.get("callbacks"), cfg.logger.kind)  # Lightning's callbacks are imported here when set
    return task


def check_init_from(init_from: Any, ckpt_path: Any) -> None:
    """``init_from`` (a run dir or .ckpt whose weights start a new run, efficient_attn_tasks/run/convert.py)
    is a path. With ``ckpt_path=last`` a run started from it resumes from its own last.ckpt (or starts from
    ``init_from`` when it has none), so a converted sweep resumes like any other; any other ``ckpt_path``
    (another checkpoint's weights, optimizer and step) is refused beside it."""
    if init_from is None:
        return
    if not isinstance(init_from, str) or not init_from:
        raise ConfigError(f"init_from must be a run dir or a .ckpt file, got {init_from!r}")
    if ckpt_path not in (None, "last"):
        raise ConfigError(f"init_from={init_from} starts a new run at step 0 from another run's weights, "
                          f"ckpt_path={ckpt_path} resumes a run with everything (weights, optimizer, step); "
                          "give one of them (ckpt_path=last resumes a run started with init_from)")


def check_transfer(steps: Any, lr: Any, init_from: Any) -> None:
    """``transfer_steps`` (stage one of a conversion, efficient_attn_tasks/run/transfer.py) is an int >= 0, set
    only with ``init_from``; ``transfer_lr`` is null (optim.lr) or a positive number."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ConfigError(f"transfer_steps must be an int >= 0 (0 = no transfer stage), got {steps!r}")
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0):
        raise ConfigError(f"transfer_lr must be a positive number or null (optim.lr), got {lr!r}")
    if steps and init_from is None:
        raise ConfigError(f"transfer_steps={steps} trains a converted model's new attention against the softmax run "
                          "it starts from: set init_from=<softmax run dir or .ckpt>, or transfer_steps=0")


def check_imports(imports: Any) -> None:
    """``imports``: modules that register the user's own attentions (``@register_attention``) or tasks
    (``@register_task``), imported before the task and attention checks, so ``attention.name=my_attention``
    or ``task=my_task`` works with no edit to this package."""
    from efficient_attn.registry import import_attentions

    modules = OmegaConf.to_container(imports) if OmegaConf.is_config(imports) else imports
    if modules is None:
        return
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise ConfigError(f"imports must be a list of module names, e.g. imports=[my_pkg.my_attention], "
                          f"got {modules!r}")
    try:
        import_attentions(modules)
    except ImportError as err:
        raise ConfigError(str(err)) from None


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
