"""One run per run dir: a new run refuses a dir that holds an earlier run unless it resumes it or says
overwrite=true, and a live run's lock keeps a second one out (efficient_attn_tasks/run/lock.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from efficient_attn_tasks.run.lock import (
    RUN_LOCK,
    RunDirBusy,
    claim_run_dir,
    earlier_run,
    hold_run_dir,
    launching_process,
)
from efficient_attn_tasks.run.record import RunRecord
from tests.helpers import QUIET, TINY_TRANSLATION

REPO = Path(__file__).resolve().parents[1]
TINY = ["task=translation", *TINY_TRANSLATION, "model=tiny", "logger=none", "threads=1", "trainer.max_epochs=1",
        *QUIET]


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "efficient_attn_tasks.commands.train", *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=300)


def earlier(run_dir: Path, *, record: str | None = "ok", checkpoint: bool = True) -> dict[str, str]:
    """A run dir as an earlier run left it; returns its files' contents by relative path."""
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text("seed: 7\n")
    if record:
        (run_dir / "results.json").write_text(json.dumps({"status": record}))
    if checkpoint:
        (run_dir / "checkpoints").mkdir()
        (run_dir / "checkpoints" / "last.ckpt").write_text("weights")
    return files(run_dir)


def files(run_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(run_dir)): p.read_text() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name != RUN_LOCK}


@pytest.mark.parametrize("record, checkpoint", [("ok", True), ("ok", False), ("failed", True)])
def test_a_new_run_in_a_dir_with_an_earlier_run_is_refused_and_leaves_it_untouched(tmp_path, record, checkpoint):
    run_dir = tmp_path / "run"
    before = earlier(run_dir, record=record, checkpoint=checkpoint)
    out = cli(*TINY, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    assert re.fullmatch(rf"error: run dir {re.escape(str(run_dir))} holds an earlier run \(.+\); resume it with "
                        r"ckpt_path=last, replace it with overwrite=true, or choose another hydra.run.dir\n",
                        out.stderr), out.stderr
    assert files(run_dir) == before  # .hydra/ too: the refusal comes before Hydra writes into the dir


def test_what_counts_as_an_earlier_run(tmp_path):
    (tmp_path / "fresh" / ".hydra").mkdir(parents=True)  # a dir Hydra just made
    assert earlier_run(tmp_path / "fresh") is None
    earlier(tmp_path / "unstarted", record="failed", checkpoint=False)  # failed before it trained
    assert earlier_run(tmp_path / "unstarted") is None
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    assert earlier_run(tmp_path / "empty") is None
    earlier(tmp_path / "trained", record=None)  # killed while training: checkpoints, no record
    assert earlier_run(tmp_path / "trained") == "checkpoints/"
    earlier(tmp_path / "done", checkpoint=False)
    assert earlier_run(tmp_path / "done") == "results.json"


def test_resuming_the_earlier_run_may_use_its_dir_another_checkpoint_may_not(tmp_path):
    run_dir = tmp_path / "run"
    earlier(run_dir)
    claim_run_dir(run_dir, "last", overwrite=False).close()
    claim_run_dir(run_dir, str(run_dir / "checkpoints" / "last.ckpt"), overwrite=False).close()
    (tmp_path / "other.ckpt").write_text("weights")
    with pytest.raises(ValueError, match="holds an earlier run"):
        claim_run_dir(run_dir, str(tmp_path / "other.ckpt"), overwrite=False)
    with pytest.raises(ValueError, match="contradict"):
        claim_run_dir(run_dir, "last", overwrite=True)
    assert (run_dir / "results.json").is_file()


def test_overwrite_clears_the_earlier_runs_outputs_only(tmp_path):
    run_dir = tmp_path / "run"
    earlier(run_dir)
    for name in ("curves.csv", "wandb_id", "notes.txt"):
        (run_dir / name).write_text("x")
    claim_run_dir(run_dir, None, overwrite=True).close()
    assert sorted(files(run_dir)) == [".hydra/config.yaml", "notes.txt"]


def test_a_held_lock_makes_a_second_start_fail_at_once(tmp_path):
    run_dir = tmp_path / "run"
    lock = hold_run_dir(run_dir)
    try:
        with pytest.raises(RunDirBusy, match=rf"is in use by another run \(pid {os.getpid()}\)"):
            hold_run_dir(run_dir)
        out = cli(*TINY, f"hydra.run.dir={run_dir}", cwd=tmp_path)
        assert out.returncode == 2
        assert out.stderr == f"error: run dir {run_dir} is in use by another run (pid {os.getpid()})\n"
        assert not (run_dir / ".hydra").exists()
    finally:
        lock.close()
    hold_run_dir(run_dir).close()  # released with its file


def test_only_the_launching_process_of_a_ddp_run_takes_the_lock(monkeypatch):
    for var in ("RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert launching_process()
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert launching_process()
    monkeypatch.setenv("LOCAL_RANK", "1")  # a process Lightning's launcher started for rank 1
    assert not launching_process()


@pytest.mark.slow
def test_resume_and_overwrite_in_the_same_dir_on_the_cli(tmp_path):
    run_dir = tmp_path / "run"
    first = cli(*TINY, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    (run_dir / "results.json").unlink()  # as a run killed before its test leaves it
    again = cli(*TINY, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert again.returncode == 2 and "holds an earlier run (checkpoints/)" in again.stderr
    resumed = cli(*TINY, "trainer.max_epochs=2", "ckpt_path=last", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert RunRecord.read(run_dir / "results.json").resumed_from == str(run_dir / "checkpoints" / "last.ckpt")
    replaced = cli(*TINY, "overwrite=true", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert replaced.returncode == 0, replaced.stderr[-2000:]
    record = RunRecord.read(run_dir / "results.json")
    assert record.resumed_from is None and "overwrite=true" in record.overrides
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best-step=4.ckpt", "last.ckpt"]
