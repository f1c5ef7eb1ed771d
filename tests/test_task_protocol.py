"""Every task follows one protocol (efficient_attn_tasks/tasks/base.py): the same top-level shape, a TaskData data
module with the common signature, a TaskModule with monitor / monitor_mode, and task_config returning its Config.
A new task the registry finds (efficient_attn_tasks/tasks/__init__.py) that deviates fails here."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import typing

import pytest
import torch
from torchmetrics.classification import MulticlassAccuracy

from efficient_attn_tasks.config.checks import check_config
from efficient_attn_tasks.config.schema import SITES
from efficient_attn_tasks.tasks import builtin_tasks, task_module
from efficient_attn_tasks.tasks.base import TaskData, TaskModule
from tests.helpers import config, tiny_cfg

COMMON_KEYWORDS = ["seed", "data_dir", "cache_dir", "max_len"]  # TaskData's run-level keywords
LOADERS = ("train_dataloader", "val_dataloader", "test_dataloader")  # TaskData's; a task supplies hooks instead


def built_classes(task) -> tuple[type, type]:
    """(data module class, Lightning module class) from ``build``'s return annotation."""
    data_cls, module_cls = typing.get_args(typing.get_type_hints(task.build)["return"])
    return data_cls, module_cls


def own_definitions(task) -> list[tuple[int, str]]:
    """(line, name) of the functions and classes the task module defines, in source order."""
    defs = [(inspect.getsourcelines(obj)[1], name) for name, obj in vars(task).items()
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and obj.__module__ == task.__name__]
    return sorted(defs)


TASKS = builtin_tasks()


def test_the_registry_finds_every_task_module_with_a_config_file():
    assert TASKS == ["listops", "lm", "mqar", "translation"]


@pytest.mark.parametrize("name", TASKS)
def test_task_module_has_the_protocols_names_and_signatures(name):
    task = task_module(name)
    assert task is importlib.import_module(f"efficient_attn_tasks.tasks.{name}")
    assert (task.__doc__ or "").strip(), f"{name}: no module docstring"
    assert dataclasses.is_dataclass(task.Config) and task.Config.__module__ == task.__name__
    assert dataclasses.fields(task.Config)[0].name == "name" and task.Config.name == name
    assert task.ATTENTION_SITES and set(task.ATTENTION_SITES) <= set(SITES)
    assert list(inspect.signature(task.build).parameters) == ["cfg"]
    if hasattr(task, "restore"):
        assert list(inspect.signature(task.restore).parameters) == ["cfg", "checkpoint"]
    data_cls, module_cls = built_classes(task)
    assert issubclass(data_cls, TaskData) and "__init__" not in vars(data_cls), \
        f"{name}: the data module is a TaskData with its signature (task, *, {', '.join(COMMON_KEYWORDS)})"
    assert not set(LOADERS) & set(vars(data_cls)), f"{name}: loaders come from TaskData (override its hooks)"
    assert "load_splits" in vars(data_cls)
    assert issubclass(module_cls, TaskModule)
    assert isinstance(module_cls.monitor, str) and module_cls.monitor_mode in ("min", "max")
    assert "loss" in module_cls.eval_means


def test_the_data_module_signature_is_one_for_every_task():
    params = list(inspect.signature(TaskData.__init__).parameters.values())[1:]
    assert params[0].name == "task" and params[0].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    assert [p.name for p in params[1:]] == COMMON_KEYWORDS
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[1:])


@pytest.mark.parametrize("name", TASKS)
def test_task_module_has_the_protocols_order(name):
    """docstring, constants, Config, task_config, data helpers, the data module, the Lightning module, build,
    restore."""
    task = task_module(name)
    data_cls, module_cls = built_classes(task)
    names = [n for _, n in own_definitions(task)]
    assert names[:2] == ["Config", "task_config"], f"{name}: Config, then task_config come first, got {names[:3]}"
    tail = ["build", "restore"] if hasattr(task, "restore") else ["build"]
    assert names[-len(tail):] == tail, f"{name}: build (then restore) come last, got {names[-3:]}"
    assert names.index(data_cls.__name__) < names.index(module_cls.__name__), \
        f"{name}: the data module comes before the Lightning module"


@pytest.mark.parametrize("name", TASKS)
def test_task_config_returns_the_modules_config(name):
    cfg = config(f"task={name}", "model=tiny", "logger=none")
    task = task_module(name)
    got = task.task_config(cfg)
    assert type(got) is task.Config and got.name == name
    assert check_config(cfg) is task


def listops_module():
    """A checked tiny ListOps module (no data built)."""
    from efficient_attn_tasks.tasks import listops

    cfg = tiny_cfg("listops", "softmax")
    check_config(cfg)
    return listops.ListOpsModule(cfg)


def test_listops_accuracy_is_the_weighted_mean_of_correct_predictions():
    """The same number as torchmetrics' micro MulticlassAccuracy, batch by batch."""
    from efficient_attn_tasks.tasks import listops

    module = listops_module()
    reference = MulticlassAccuracy(num_classes=listops.NUM_CLASSES, average="micro")
    g = torch.Generator().manual_seed(0)
    for size in (16, 16, 7):  # a smaller last batch
        logits = torch.randn(size, listops.NUM_CLASSES, generator=g)  # (B, 10)
        labels = torch.randint(listops.NUM_CLASSES, (size,), generator=g)  # (B,)
        module.forward = lambda batch, logits=logits: logits
        module.validation_step({"label": labels}, 0)
        reference.update(logits, labels)
    assert module.means["val_acc"].compute() == reference.compute()


def test_a_nan_evaluation_value_makes_the_logged_mean_nan():
    """Every task's evaluation means keep NaN (torchmetrics' default would drop it with a warning: a
    broken evaluation batch would leave a finite, wrong mean)."""
    module = listops_module()
    module.accumulate("val", "loss", torch.tensor([1.0, 2.0]), weight=torch.tensor([1.0, 3.0]))
    assert module.means["val_loss"].compute() == 1.75  # weighted (torchmetrics' "disable" would give 1.5)
    module.accumulate("val", "loss", torch.tensor([float("nan")]), weight=torch.tensor([1.0]))
    assert torch.isnan(module.means["val_loss"].compute())
