"""A user's own attention, outside this package, in every command.

A throwaway distribution is built and installed with ``pip --target`` into a temp dir (never into the
test environment), declaring attentions through the ``efficient_attn.attentions`` entry-point group: a
module that registers with ``@register_attention``, a bare class registered under its entry point's name,
and a broken entry. Each command then runs in a fresh interpreter with that dir on ``PYTHONPATH``, from
a temp working dir. A plain module on ``PYTHONPATH`` (not installed) is reached with ``imports=[...]``.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from efficient_attn_tasks.run.record import RunRecord
from tests.helpers import tiny_overrides

MODULE = '''
import torch
from efficient_attn import Attention, register_attention


@register_attention("{name}")
class TemperatureAttention(Attention):
    """softmax(q·k / (τ √d)) v: scaled dot-product with a temperature τ."""

    def __init__(self, head_dim: int, num_heads: int, *, temperature: float = 1.0) -> None:
        super().__init__(head_dim, num_heads)
        self.temperature = temperature

    def attend(self, q, k, v, key_padding_mask, causal):
        scores = q @ k.transpose(-1, -2) / (self.temperature * self.head_dim ** 0.5)  # (B, H, L, S)
        if key_padding_mask is not None:
            scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        if causal:
            future = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).triu(1)  # (L, S)
            scores = scores.masked_fill(future, float("-inf"))
        return scores.softmax(-1) @ v
'''
BARE = '''
from efficient_attn.attention.softmax import SoftmaxAttention


class BareAttention(SoftmaxAttention):
    """Not decorated: the entry point's name registers it."""
'''
PYPROJECT = '''
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "my-attn-plugin"
version = "0.0.1"

[project.entry-points."efficient_attn.attentions"]
my_attention = "my_attn_plugin.attention"
my_bare = "my_attn_plugin.bare:BareAttention"
my_broken = "my_attn_plugin.missing"

[tool.setuptools]
packages = ["my_attn_plugin"]
'''
TINY = [*tiny_overrides("listops"), "threads=1", "trainer.max_steps=2"]


@pytest.fixture(scope="module")
def plugin(tmp_path_factory) -> Path:
    """The installed plugin's dir (``pip install --target``), for ``PYTHONPATH``."""
    root = tmp_path_factory.mktemp("plugin")
    src = root / "src"
    (src / "my_attn_plugin").mkdir(parents=True)
    (src / "pyproject.toml").write_text(PYPROJECT)
    (src / "my_attn_plugin" / "__init__.py").write_text("")
    (src / "my_attn_plugin" / "attention.py").write_text(MODULE.format(name="my_attention"))
    (src / "my_attn_plugin" / "bare.py").write_text(BARE)
    site = root / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(src)], check=True, capture_output=True, text=True)
    (root / "loose").mkdir()
    (root / "loose" / "loose_attention.py").write_text(MODULE.format(name="loose"))  # on PYTHONPATH, not installed
    return site


def run(args: list[str], plugin: Path, cwd: Path, *, extra_path: Path | None = None) -> subprocess.CompletedProcess:
    paths = [str(plugin), *([str(extra_path)] if extra_path else []), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_entry_points_register_and_a_broken_one_is_named(plugin, tmp_path):
    script = textwrap.dedent('''
        import warnings, efficient_attn as ea
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            names = ea.list_attentions()
        print(names)
        print([str(w.message) for w in caught])
        try:
            ea.create_attention("my_attentoin", head_dim=8, num_heads=2)
        except ValueError as err:
            print(err)
        print(ea.attention_options("my_attention"), ea.get_attention_class("my_bare").__name__)
    ''')
    out = run(["-c", script], plugin, tmp_path)
    assert out.returncode == 0, out.stderr
    names, warned, error, options = out.stdout.splitlines()
    assert "'my_attention'" in names and "'my_bare'" in names and "'softmax'" in names
    assert "my_broken = 'my_attn_plugin.missing' (from my-attn-plugin) failed to load: ModuleNotFoundError" in warned
    assert "Did you mean 'my_attention'?" in error and "my_broken" in error and "failed to load" in error
    assert options == "{'temperature': 1.0} BareAttention"


@pytest.mark.slow
def test_plugin_attention_trains_evaluates_and_reports(plugin, tmp_path):
    """``attention.name=my_attention`` with its own option: the run is labelled by it (not by the default
    ``attention=softmax`` file it replaced), the checkpoint evaluates, the report lists it."""
    run_dir = tmp_path / "run"
    out = run(["-m", "efficient_attn_tasks.commands.train", *TINY, "attention.name=my_attention",
               "+attention.kwargs.temperature=2.0", f"hydra.run.dir={run_dir}"], plugin, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    record = RunRecord.read(run_dir / "results.json")
    assert (record.status, record.attention, record.attention_config) == ("ok", "my_attention", "my_attention")
    assert record.config["attention"]["kwargs"] == {"temperature": 2.0}
    evaluated = run(["-m", "efficient_attn_tasks.commands.evaluate", str(run_dir), "--out",
                     str(tmp_path / "eval.json")],
                    plugin, tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    scored = json.loads((tmp_path / "eval.json").read_text())["metrics"]["acc"]
    assert record.metrics.test["test/acc"] == pytest.approx(scored)
    report = run(["-m", "efficient_attn_tasks.commands.report", str(run_dir)], plugin, tmp_path)
    assert report.returncode == 0 and "my_attention" in report.stdout, report.stderr[-3000:]


@pytest.mark.slow
def test_plugin_attention_in_bench_and_approx(plugin, tmp_path):
    bench = run(["-m", "efficient_attn_tasks.commands.bench", "--attentions", "my_attention,softmax",
                 "--modes", "noncausal", "--lengths", "32", "--heads", "2", "--head-dim", "8", "--repeats", "1",
                 "--threads", "1", "--no-baselines", "--matmul-size", "64", "--out", str(tmp_path / "bench")],
                plugin, tmp_path)
    assert bench.returncode == 0, bench.stderr[-3000:]
    rows = next((tmp_path / "bench").glob("bench_*.csv")).read_text().splitlines()
    assert any(r.startswith("my_attention,") and ",ok," in r for r in rows), rows
    approx = run(["-m", "efficient_attn_tasks.commands.approx", "--quick", "--draws", "1", "--length", "64",
                  "--attentions", "my_attention", "--out", str(tmp_path / "approx")], plugin, tmp_path)
    assert approx.returncode == 0, approx.stderr[-3000:]
    with open(tmp_path / "approx" / "error_vs_features.csv") as f:
        curve = [r for r in csv.DictReader(f) if r["estimator"] == "my_attention"]
    assert curve and float(curve[0]["mse_mean"]) < 1e-20  # τ = 1: exactly softmax, in float64


@pytest.mark.slow
def test_imports_key_reaches_a_module_that_is_not_installed(plugin, tmp_path):
    loose = plugin.parent / "loose"
    run_dir = tmp_path / "run"
    out = run(["-m", "efficient_attn_tasks.commands.train", *TINY, "imports=[loose_attention]", "attention.name=loose",
               f"hydra.run.dir={run_dir}"], plugin, tmp_path, extra_path=loose)
    assert out.returncode == 0, out.stderr[-3000:]
    assert RunRecord.read(run_dir / "results.json").attention == "loose"
    bench = run(["-m", "efficient_attn_tasks.commands.bench", "--imports", "loose_attention", "--attentions", "loose",
                 "--modes", "causal", "--lengths", "16", "--heads", "1", "--head-dim", "4", "--repeats", "1",
                 "--threads", "1", "--no-baselines", "--matmul-size", "64", "--out", str(tmp_path / "bench")],
                plugin, tmp_path, extra_path=loose)
    assert bench.returncode == 0, bench.stderr[-3000:]
    csv_lines = next((tmp_path / "bench").glob("bench_*.csv")).read_text().splitlines()
    rows = [r for r in csv_lines if r.startswith("loose,")]
    assert rows and all(",ok," in r for r in rows), rows  # measured in the worker process, which imports it too
    script = shutil.which("efficient-attn-train")  # its sys.path starts at its bin dir, not at the working dir
    in_cwd = run([script, *TINY, "imports=[loose_attention]", "attention.name=loose",
                  f"hydra.run.dir={tmp_path / 'cwd'}"],
                 plugin, loose)  # a module in the working dir, as a user has it
    assert in_cwd.returncode == 0, in_cwd.stderr[-3000:]
    missing = run(["-m", "efficient_attn_tasks.commands.train", *TINY, "imports=[no_such_module]"], plugin, tmp_path)
    assert missing.returncode != 0
    assert "imports: cannot import 'no_such_module'" in missing.stderr
    unlisted = run(["-m", "efficient_attn_tasks.commands.train", *TINY, "attention.name=loose"], plugin, tmp_path,
                   extra_path=loose)
    assert unlisted.returncode != 0 and "unknown attention 'loose'" in unlisted.stderr
