"""Ctrl-C on a real training run: it saves last.ckpt at the end of its step, writes an interrupted record, says
in one line where it saved and how to resume, exits 130; the printed command finishes the same run."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from efficient_attn_tasks.commands import report
from efficient_attn_tasks.commands.train import resume_command
from efficient_attn_tasks.report.runs import find_runs
from efficient_attn_tasks.report.summary import summarize
from efficient_attn_tasks.run.fit import interrupt_signal
from efficient_attn_tasks.run.record import RESULTS_JSON, RunError, RunRecord
from efficient_attn_tasks.run.resume import remove_unstarted_run_dir, resume_checkpoint
from tests.helpers import TINY_LISTOPS

REPO = Path(__file__).resolve().parents[1]
TRAIN = [sys.executable, "-m", "efficient_attn_tasks.commands.train"]
STEPS, BATCHES = 200, 20  # 20 batches an epoch: Ctrl-C lands mid-epoch
OVERRIDES = ["task=listops", "model=tiny", "logger=none", *TINY_LISTOPS, f"task.train_size={16 * BATCHES}",
             "trainer.max_epochs=-1", f"trainer.max_steps={STEPS}", "trainer.enable_progress_bar=false"]


@pytest.mark.slow
def test_ctrl_c_saves_the_step_reached_records_it_and_the_printed_command_finishes_the_run(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled",
           "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out, err = (tmp_path / "stdout.txt").open("w+"), (tmp_path / "stderr.txt").open("w+")
    proc = subprocess.Popen([*TRAIN, *OVERRIDES], cwd=tmp_path, env=env, stdout=out, stderr=err, text=True)
    start = time.monotonic()
    while "epoch 1" not in (tmp_path / "stdout.txt").read_text() and time.monotonic() - start < 120:
        assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130, (tmp_path / "stderr.txt").read_text()
    lines = (tmp_path / "stderr.txt").read_text().splitlines()
    said = [ln for ln in lines if ln.startswith("interrupted at step")]
    assert len(said) == 1, lines

    (run_dir,) = [p.parent for p in tmp_path.glob("outputs/*/*/.hydra")]
    record = RunRecord.read(run_dir / RESULTS_JSON)
    assert record.status == "interrupted" and record.stopped and record.metrics is None
    assert BATCHES <= record.steps < STEPS and record.error.type == "KeyboardInterrupt"
    last = run_dir / "checkpoints" / "last.ckpt"
    assert said[0].startswith(f"interrupted at step {record.steps} by SIGINT; saved {last}; resume with: ")
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    position = ckpt["data_position"]  # saved at the end of a step: the batches it trained, no more
    assert ckpt["global_step"] == record.steps == position["epoch"] * BATCHES + position["batches"]

    command = shlex.split(said[0].split("resume with: ", 1)[1])
    assert command[0] == "efficient-attn-train" and command[1:] == [*OVERRIDES, "ckpt_path=last"]
    second = subprocess.run([*TRAIN, *command[1:]], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    finished = RunRecord.read(run_dir / RESULTS_JSON)
    assert finished.status == "ok" and finished.steps == STEPS and finished.resumed_from == str(last)
    assert len(list(tmp_path.glob("outputs/*/*/.hydra"))) == 1  # the same run dir, continued


def interrupted_record(steps: int = 7) -> RunRecord:
    return RunRecord(name="listops", task="listops", attention="softmax", seed=0, status="interrupted",
                     error=RunError("KeyboardInterrupt", f"interrupted at step {steps} by SIGINT; saved last.ckpt"),
                     steps=steps, wall_time_s=1.0)


def test_an_interrupted_record_reads_back_as_a_stopped_run_without_metrics():
    record = interrupted_record()
    saved = json.loads(record.to_json())
    assert saved["status"] == "interrupted" and "metrics" not in saved and saved["steps"] == 7
    back = RunRecord.from_json(record.to_json())
    assert back == record and back.stopped and not back.failed and back.metrics is None
    assert RunRecord.from_json({"status": "interrupted"}).steps == 0  # hand-written: stopped before training


def test_ckpt_path_last_continues_an_interrupted_run_and_the_report_lists_it_unaveraged(tmp_path, capsys):
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"")
    interrupted_record().write(run_dir / RESULTS_JSON)
    assert resume_checkpoint("last", run_dir) == str(run_dir / "checkpoints" / "last.ckpt")
    records, missing, stopped = find_runs([tmp_path])
    assert records == [] and missing == [] and [r["status"] for r in stopped] == ["interrupted"]
    report.main([str(tmp_path), "--rows", "attention"])
    assert f"| {run_dir} (interrupted at step 7: KeyboardInterrupt: interrupted at step 7 by SIGINT" in \
        capsys.readouterr().out
    text, unfinished = summarize(tmp_path)  # the sweep summary
    assert unfinished == 1 and "(interrupted at step 7" in text and "results.json status interrupted;" in text
    assert remove_unstarted_run_dir(run_dir) is False  # an interrupted run keeps its dir


def test_the_signal_behind_a_stop_and_the_command_that_resumes(tmp_path):
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            sys.exit(1)  # as Lightning exits after handling Ctrl-C
    except SystemExit as err:
        assert interrupt_signal(err) == signal.SIGINT
    assert interrupt_signal(KeyboardInterrupt()) == signal.SIGINT
    assert interrupt_signal(SIGTERMException()) == signal.SIGTERM
    assert interrupt_signal(SystemExit(1)) is None and interrupt_signal(ValueError()) is None

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert resume_command(["task=listops", "callbacks=[ema,lr_monitor]", "ckpt_path=x.ckpt"], tmp_path, None) == \
        "efficient-attn-train task=listops 'callbacks=[ema,lr_monitor]' ckpt_path=last"
    assert resume_command(["-m", "seed=0,1"], tmp_path / "0", tmp_path) == \
        f"efficient-attn-train -m seed=0,1 hydra.sweep.dir={tmp_path} ckpt_path=last"
    assert resume_command(["task=mqar"], tmp_path / "new", None) == \
        f"efficient-attn-train task=mqar hydra.run.dir={tmp_path / 'new'} ckpt_path=last"  # no last.ckpt: this dir
