"""Installed as a wheel, not only editable.

The wheel is built from this checkout (``pip wheel``, no network: the test environment's setuptools) and
installed with ``pip install --target`` into a temp dir, never into the test environment. Every console
command then runs from a temp working dir outside the checkout, with that dir first on ``PYTHONPATH``, so
the installed copy (its bundled ``configs/``) is the one that answers, not the checkout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SCRIPTS = PYPROJECT["project"]["scripts"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Built from a copy of the sources, so no stale ``build/`` of the checkout can leak files into it."""
    out, src = tmp_path_factory.mktemp("wheel"), tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, src / name)
    for name in ("efficient_attn", "efficient_attn_tasks", "configs"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w",
                    str(out), str(src)], check=True, capture_output=True, text=True, cwd=out)
    return next(out.glob("efficient_attn-*.whl"))


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, text=True)
    return site


def run(cmd: list[str], site: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_wheel_has_no_generic_top_level_names_and_every_config(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert top == {"efficient_attn", "efficient_attn_tasks", "efficient_attn-0.1.0.dist-info"}
    packages = {str(p.parent.relative_to(REPO)) for top in ("efficient_attn", "efficient_attn_tasks")
                for p in (REPO / top).rglob("__init__.py")}
    assert packages <= {name.rsplit("/", 1)[0] for name in names}  # every subpackage is listed in pyproject
    configs = {f"efficient_attn_tasks/configs/{p.relative_to(REPO / 'configs')}"
               for p in (REPO / "configs").rglob("*.yaml")}
    assert configs and configs <= set(names)
    modules = {str(p.relative_to(REPO)) for p in (REPO / "efficient_attn_tasks").rglob("*.py")}
    assert modules <= set(names)
    assert not [n for n in names if n.startswith(("tools/", "tests/"))]  # tools and tests stay out of the wheel


def test_core_needs_only_torch_einops_and_numpy():
    """numpy only so that importing torch does not warn "Failed to initialize NumPy"."""
    core = [req.split(">")[0].split("=")[0].split("<")[0] for req in PYPROJECT["project"]["dependencies"]]
    assert core == ["torch", "einops", "numpy"]
    assert "pytorch-lightning>=2.2,<3" in PYPROJECT["project"]["optional-dependencies"]["train"]


@pytest.mark.slow
def test_every_console_command_runs_from_the_installed_wheel(installed, tmp_path):
    where = run([sys.executable, "-c", "import efficient_attn, efficient_attn_tasks, importlib.util; "
                 "print(efficient_attn.__file__); print(efficient_attn_tasks.__file__); "
                 "print(importlib.util.find_spec('tasks'))"], installed, tmp_path)
    ea_file, tasks_file, bare = where.stdout.split()
    assert ea_file.startswith(str(installed)) and tasks_file.startswith(str(installed)), where.stdout
    assert bare == "None"  # no module named ``tasks`` is installed
    for script in SCRIPTS:
        out = run([str(installed / "bin" / script), "--help"], installed, tmp_path)
        assert out.returncode == 0 and script in out.stdout, (script, out.stderr)


@pytest.mark.slow
def test_installed_train_then_eval_and_report_from_a_temp_dir(installed, tmp_path):
    """The Hydra configs come from inside the wheel: a one-step run, its checkpoint scored, its row reported."""
    run_dir = tmp_path / "run"
    train = run([str(installed / "bin" / "efficient-attn-train"), "task=listops", "model=tiny", "logger=none",
                 "threads=1", "task.train_size=32", "task.val_size=8", "task.test_size=8", "task.min_length=10",
                 "task.max_length=40", "task.batch_size=8", "trainer.max_steps=1", "attention=favor_plus",
                 f"hydra.run.dir={run_dir}"], installed, tmp_path)
    assert train.returncode == 0, train.stderr[-3000:]
    record = json.loads((run_dir / "results.json").read_text())
    assert record["attention_config"] == "favor_plus" and record["status"] == "ok"
    hydra = (run_dir / ".hydra" / "hydra.yaml").read_text()
    assert str(installed / "efficient_attn_tasks" / "configs") in hydra  # the wheel's configs, not the checkout's
    evaluated = run([str(installed / "bin" / "efficient-attn-eval"), str(run_dir)], installed, tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    report = run([str(installed / "bin" / "efficient-attn-report"), str(tmp_path)], installed, tmp_path)
    assert report.returncode == 0 and "favor_plus" in report.stdout, report.stderr[-3000:]
