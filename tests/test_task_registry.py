"""The task registry (efficient_attn_tasks/tasks/__init__.py): a task is one module and one config file.

A toy task outside this package (a module on ``PYTHONPATH`` that registers with ``@register_task``, and
``task/toy.yaml`` in a config dir given with ``--config-dir``) trains, tests and evaluates through the
commands, with no edit to the package; unknown, misnamed, twice-defined and incomplete tasks are refused
with a message that says what to do.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from efficient_attn_tasks import tasks
from efficient_attn_tasks.config.checks import CONFIG_DIR, ConfigError, check_config
from efficient_attn_tasks.tasks import register_task, task_module, task_names

REPO = Path(__file__).resolve().parents[1]

TOY_MODULE = '''
"""Toy task: predict each token of a sequence from the tokens before it; the sequence counts up modulo V."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor

from efficient_attn.transformer import TransformerLM
from efficient_attn_tasks.config.schema import attention_spec, transformer_config
from efficient_attn_tasks.tasks import register_task
from efficient_attn_tasks.tasks.base import TaskData, TaskModule, data_options, task_section

ATTENTION_SITES = ("decoder",)


@register_task("toy")
@dataclass
class Config:
    """The ``task:`` section for ``task=toy``."""

    name: str = "toy"
    vocab_size: int = 8
    seq_len: int = 8
    size: int = 16
    batch_size: int = 8
    num_workers: int = 0

    longest_from = "task.seq_len"

    def __post_init__(self) -> None:
        if self.vocab_size < 2:
            raise ValueError(f"task.vocab_size must be >= 2, got {self.vocab_size}")

    @property
    def longest_sequence(self) -> int:
        return self.seq_len


def task_config(cfg: DictConfig) -> Config:
    return task_section(cfg, Config)


class ToyData(TaskData):
    def load_splits(self) -> dict[str, Tensor]:
        t = self.task
        start = torch.arange(t.size)[:, None]  # (N, 1)
        rows = (start + torch.arange(t.seq_len)) % t.vocab_size  # (N, L)
        return {split: rows for split in ("train", "val", "test")}


class ToyModule(TaskModule):
    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg)
        self.task = task_config(cfg)
        self.model = TransformerLM(transformer_config(cfg), self.task.vocab_size,
                                   attention=attention_spec(cfg, "decoder"))

    def forward(self, batch: Tensor) -> Tensor:
        return self.model(batch[:, :-1])  # (B, L-1, V)

    def loss(self, batch: Tensor) -> Tensor:
        return F.cross_entropy(self(batch).flatten(0, 1), batch[:, 1:].flatten())

    def batch_tokens(self, batch: Tensor) -> int:
        return batch.numel()

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        loss, logged = self.global_mean(self.loss(batch), batch[:, 1:].numel())
        self.log("train/loss", logged, on_step=True, on_epoch=False, batch_size=len(batch))
        return loss

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        self.accumulate("val", "loss", self.loss(batch), batch[:, 1:].numel())

    def test_step(self, batch: Tensor, batch_idx: int) -> None:
        self.accumulate("test", "loss", self.loss(batch), batch[:, 1:].numel())


def build(cfg: DictConfig) -> tuple[ToyData, ToyModule]:
    return ToyData(task_config(cfg), **data_options(cfg)), ToyModule(cfg)
'''
TOY_CONFIG = "name: toy\nvocab_size: 8\nseq_len: 8\nsize: 16\nbatch_size: 8\nnum_workers: 0\n"
RUN = ["task=toy", "imports=[toy_task]", "model=tiny", "logger=none", "callbacks=none", "threads=1",
       "trainer.max_steps=2", "trainer.enable_progress_bar=false", "++trainer.enable_model_summary=false"]


def _run(args: list[str], path: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0",
           "PYTHONPATH": os.pathsep.join([str(path), str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_a_task_from_outside_the_package_trains_tests_and_evaluates(tmp_path):
    """One module and one config file: no registry, schema or check to edit."""
    code, conf, run_dir = tmp_path / "code", tmp_path / "conf", tmp_path / "run"
    code.mkdir()
    (code / "toy_task.py").write_text(TOY_MODULE)
    (conf / "task").mkdir(parents=True)
    (conf / "task" / "toy.yaml").write_text(TOY_CONFIG)
    out = _run(["-m", "efficient_attn_tasks.commands.train", "--config-dir", str(conf), *RUN,
                f"hydra.run.dir={run_dir}"], code, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    record = json.loads((run_dir / "results.json").read_text())
    assert (record["status"], record["task"], record["steps"]) == ("ok", "toy", 2)
    assert record["config"]["model"]["max_len"] == 8  # filled in from the toy Config's longest_sequence
    assert record["metrics"]["test"]["test/loss"] > 0
    evaluated = _run(["-m", "efficient_attn_tasks.commands.evaluate", str(run_dir), "--out", str(tmp_path / "e.json")],
                     code, tmp_path)  # the checkpoint's imports register the task again
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    score = json.loads((tmp_path / "e.json").read_text())["metrics"]["loss"]
    assert score == pytest.approx(record["metrics"]["test"]["test/loss"])
    refused = _run(["-m", "efficient_attn_tasks.commands.train", "--config-dir", str(conf), *RUN,
                    "task.vocab_size=1", f"hydra.run.dir={tmp_path / 'bad'}"], code, tmp_path)
    assert refused.returncode != 0 and "task.toy: task.vocab_size must be >= 2, got 1" in refused.stderr
    without_imports = [arg for arg in RUN if not arg.startswith("imports=")]
    unlisted = _run(["-m", "efficient_attn_tasks.commands.train", "--config-dir", str(conf), *without_imports,
                     f"hydra.run.dir={tmp_path / 'unlisted'}"], code, tmp_path)
    assert unlisted.returncode != 0 and "unknown task 'toy'" in unlisted.stderr


@pytest.fixture
def registry(monkeypatch):
    """A copy of the registry (every built-in task registered first), so a test's registrations leave no trace."""
    for name in tasks.builtin_tasks():
        task_module(name)
    monkeypatch.setattr(tasks, "_REGISTRY", dict(tasks._REGISTRY))
    return tasks._REGISTRY


def config(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=list(overrides))


def test_built_in_tasks_are_found_by_name_and_unknown_ones_are_refused(registry):
    assert task_names() == ["listops", "lm", "mqar", "translation"]
    assert task_module("mqar").__name__ == "efficient_attn_tasks.tasks.mqar"
    with pytest.raises(ValueError,
                       match=r"unknown task 'mt'; choose one of \['listops', 'lm', 'mqar', 'translation'\]"):
        task_module("mt")
    with pytest.raises(ValueError, match="unknown task 'data'"):  # a helper module of the package, no config file
        task_module("data")
    with pytest.raises(ConfigError, match=r"unknown task 'mt'; .* list the module that registers it .* in imports"):
        check_config(config("task.name=mt"))


def test_a_task_is_registered_once_under_its_configs_name(registry):
    @dataclass
    class Config:
        name: str = "other"

    with pytest.raises(ValueError, match="its Config's name must default to 'toy2'"):
        register_task("toy2")(Config)
    Config.__module__ = "somewhere"
    assert register_task("other")(Config) is Config and registry["other"] == "somewhere"
    assert register_task("other")(Config) is Config  # the same module again (a reload): no conflict
    with pytest.raises(ValueError, match="task 'other' is defined twice: in somewhere and in elsewhere"):
        register_task("other")(type("Config", (), {"name": "other", "__module__": "elsewhere"}))


def test_a_module_missing_part_of_the_protocol_is_named(registry, monkeypatch):
    module = types.ModuleType("half_task")
    module.Config = register_task("half")(type("Config", (), {"name": "half", "__module__": "half_task"}))
    monkeypatch.setitem(sys.modules, "half_task", module)
    with pytest.raises(ValueError, match=r"task 'half': half_task lacks \['ATTENTION_SITES', 'task_config', 'build'\]"):
        task_module("half")
    assert "half" in task_names()
