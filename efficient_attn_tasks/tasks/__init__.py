"""The task registry: a task's name (``task.name``) and the module that defines it.

A task is one module following the task protocol (efficient_attn_tasks/tasks/base.py) and one config file,
``configs/task/<name>.yaml``. The module registers itself by decorating its ``Config`` with
:func:`register_task`. This package's modules that have such a config file are found by name, imported on
first use; a module elsewhere registers when it is imported (the run config's ``imports``). Importing this
package loads neither torch nor Lightning; :func:`task_module` loads the task's code.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType
from typing import Callable, TypeVar

Schema = TypeVar("Schema", bound=type)
PROTOCOL = ("Config", "ATTENTION_SITES", "task_config", "build")  # the names the app reads from a task module
_REGISTRY: dict[str, str] = {}  # task name -> the name of the module that defines it


def register_task(name: str) -> Callable[[Schema], Schema]:
    """Class decorator for a task module's ``Config`` (its ``task:`` section, a dataclass whose ``name``
    defaults to ``name``): the module that defines it is the task ``name``."""

    def register(cls: Schema) -> Schema:
        if getattr(cls, "name", None) != name:
            raise ValueError(f"task {name!r}: its Config's name must default to {name!r} (the config file's "
                             f"task.name), got {getattr(cls, 'name', None)!r}")
        known = _REGISTRY.setdefault(name, cls.__module__)
        if known != cls.__module__:
            raise ValueError(f"task {name!r} is defined twice: in {known} and in {cls.__module__}")
        return cls

    return register


def builtin_tasks() -> list[str]:
    """This package's task modules: those with a config file ``configs/task/<name>.yaml``."""
    from efficient_attn_tasks import config_dir

    configs = config_dir() / "task"
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if (configs / f"{m.name}.yaml").is_file())


def task_names() -> list[str]:
    """Every task a config can name: this package's and those registered from elsewhere."""
    return sorted({*builtin_tasks(), *_REGISTRY})


def task_module(name: str) -> ModuleType:
    """The module of task ``name``, imported (torch, Lightning and the task's own dependencies load);
    ``ValueError`` for an unknown task or a module that lacks a name of the protocol."""
    if name not in _REGISTRY and name in builtin_tasks():
        importlib.import_module(f"{__name__}.{name}")
        if name not in _REGISTRY:
            raise ValueError(f"task {name!r}: {__name__}.{name} registers no task; decorate its Config with "
                             f"@register_task({name!r})")
    if name not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; choose one of {task_names()}, or list the module that "
                         "registers it (@register_task) in imports")
    module = importlib.import_module(_REGISTRY[name])
    missing = [attr for attr in PROTOCOL if not hasattr(module, attr)]
    if missing:
        raise ValueError(f"task {name!r}: {module.__name__} lacks {missing} of the task protocol "
                         "(efficient_attn_tasks/tasks/base.py)")
    return module
