"""Thread choice of a training run: the cores other processes leave free (efficient_attn_tasks/run/threads.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from efficient_attn_tasks.run.threads import _cpu_times, busy_cores, default_threads

STAT = """cpu  400 0 100 500 0 0 0 0 0 0
cpu0 300 0 50 150 0 0 0 0 0 0
cpu1 100 0 50 350 10 0 0 0 0 0
intr 1 2 3
"""


@pytest.mark.parametrize("threads, n_jobs, cpus, busy, expected", [
    (None, None, 2, None, None),  # nothing known: torch's default
    (None, None, 2, 0.3, None),  # under half a core busy: torch's default
    (None, None, 2, 1.0, 1),  # one busy core of 2: 1 thread
    (None, None, 2, 0.6, 1),
    (None, None, 2, 2.0, 1),  # every core busy: never below 1
    (None, None, 8, 2.6, 5),  # 5.4 cores free
    (None, None, 8, 2.4, 6),
    (None, 1, 2, 1.0, 1),  # one joblib job at a time: the load counts
    (None, 2, 16, 5.0, 8),  # k jobs at once share the cores
    (3, None, 2, 2.0, 3),  # an explicit threads=N wins
])
def test_default_threads_leaves_busy_cores_alone(threads, n_jobs, cpus, busy, expected):
    assert default_threads(threads, n_jobs, cpus, busy) == expected


def test_cpu_times_sums_the_allowed_cpus(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text(STAT)
    assert _cpu_times({0, 1}, stat) == (500.0, 1010.0)  # idle and iowait are not busy
    assert _cpu_times({1}, stat) == (150.0, 510.0)
    assert _cpu_times({5}, stat) is None
    assert _cpu_times({0}, tmp_path / "missing") is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/stat")
def test_busy_cores_sees_a_spinning_process():
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        assert busy_cores(0.5) >= 0.5
    finally:
        spinner.kill()
        spinner.wait()


def test_a_run_takes_the_free_cores_and_says_so(monkeypatch, capsys):
    import torch

    from efficient_attn_tasks.run import fit

    before = torch.get_num_threads()
    monkeypatch.setattr(fit, "busy_cores", lambda: 1.0)
    monkeypatch.setattr(fit.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(fit, "joblib_n_jobs", lambda: None)
    try:
        torch.set_num_threads(2)
        fit.set_threads(None)
        assert torch.get_num_threads() == 1
        assert "1.0 of 2 cores busy" in capsys.readouterr().out
        fit.set_threads(2)  # an explicit threads=N wins
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("given, expected", [
    ({}, "GOMP_SPINCOUNT=1000 OMP_WAIT_POLICY=None"),  # the package's bounded spin
    ({"OMP_WAIT_POLICY": "ACTIVE"}, "GOMP_SPINCOUNT=None OMP_WAIT_POLICY=ACTIVE"),  # the user's own wins
    ({"GOMP_SPINCOUNT": "5"}, "GOMP_SPINCOUNT=5 OMP_WAIT_POLICY=None"),
])
def test_the_package_bounds_openmp_spinning_before_torch_loads(given, expected):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    code = ("import efficient_attn_tasks, os, sys; assert 'torch' not in sys.modules; "
            "print(' '.join(f'{k}={os.environ.get(k)}' for k in ('GOMP_SPINCOUNT', 'OMP_WAIT_POLICY')))")
    out = subprocess.run([sys.executable, "-c", code], env={**env, **given}, capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert out.strip() == expected


def _row(setting, load, attention, wall, repeat=0, status="ok", threads=2):
    return {"setting": setting, "load": load, "attention": attention, "wall_s": wall, "repeat": repeat,
            "status": status, "threads": threads}


def test_contention_summary_ratios_to_the_same_settings_idle_time():
    from efficient_attn_tasks.bench.contention import median_wall, summary

    rows = [_row("default", 0, "a", 10), _row("default", 0, "b", 30), _row("default", 1, "a", 12),
            _row("default", 1, "b", 48), _row("before", 0, "a", 5), _row("before", 0, "b", 15),
            _row("before", 1, "a", 600, status="timeout"), _row("before", 1, "b", 20),
            _row("default", 0, "a", 14, repeat=1), _row("default", 0, "b", 30, repeat=1),
            _row("default", 1, "a", 12, repeat=1), _row("default", 1, "b", 52, repeat=1)]
    assert median_wall(rows, "default", 0) == 42.0  # repeats summed over jobs (40, 44), then the median
    text = summary(rows, ["default", "before"], [0, 1], ["a", "b"], "m", "cmd")
    assert "| default | 42.0 (1.00×) | 62.0 (1.48×) |" in text
    assert "| before | 20.0 (1.00×) | >620.0 (>31.00×) |" in text  # a job stopped at the timeout: a lower bound
    assert "| default | b | 2 | 30.0 (1.00×) | 50.0 (1.67×) |" in text
