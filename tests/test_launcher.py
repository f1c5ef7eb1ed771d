"""Sweeps through hydra-submitit-launcher (configs/hydra/launcher/slurm.yaml, local.yaml): a two-job sweep runs
through the submitit local executor into the job dirs of any sweep and reads back with efficient-attn-report; the
SLURM launcher asks for Lightning's nodes and devices; a job that SLURM requeued resumes from its last.ckpt."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from efficient_attn_tasks.commands.report import main as report
from efficient_attn_tasks.config.checks import CONFIG_DIR
from efficient_attn_tasks.run.record import RunRecord
from efficient_attn_tasks.run.resume import requeued_checkpoint
from tests.helpers import QUIET, TINY_MQAR

REPO = Path(__file__).resolve().parents[1]


def hydra_config(*overrides: str):
    """The composed config with its ``hydra`` node (the launcher, the sweep dir)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def test_a_job_that_slurm_requeued_resumes_from_its_last_checkpoint(capsys):
    assert requeued_checkpoint(None, {"SLURM_RESTART_COUNT": "1"}) == "last"
    assert "SLURM restarted this job (1 time(s)): ckpt_path=last" in capsys.readouterr().out
    assert requeued_checkpoint(None, {"SLURM_RESTART_COUNT": "0"}) is None  # its first start
    assert requeued_checkpoint(None, {}) is None  # not under SLURM
    assert requeued_checkpoint("run/checkpoints/x.ckpt", {"SLURM_RESTART_COUNT": "2"}) == "run/checkpoints/x.ckpt"


def test_slurm_launcher_asks_for_lightnings_nodes_and_devices_and_keeps_the_sweep_dirs():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from omegaconf import OmegaConf

    ddp = ("experiment=mqar/grid", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2", "seed=1")
    plain = hydra_config(*ddp)
    cfg = hydra_config(*ddp, "hydra/launcher=slurm", "hydra.launcher.partition=gpu")
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher["partition"], launcher["nodes"], launcher["tasks_per_node"], launcher["gpus_per_node"]) == \
        ("gpu", 2, 4, 4)
    assert "n_jobs" not in launcher  # the experiment's joblib setting goes with its launcher
    sweep = OmegaConf.to_container(cfg.hydra.sweep, resolve=True)
    assert sweep == OmegaConf.to_container(plain.hydra.sweep, resolve=True)  # job dirs named as with joblib:
    assert sweep["subdir"] == "seed=1,trainer.devices=4,trainer.num_nodes=2,trainer=ddp"  # ckpt_path=last finds them
    assert plain.hydra.launcher.n_jobs == 2 and "Joblib" in plain.hydra.launcher._target_
    local = hydra_config("experiment=mqar/quick", "hydra/launcher=local").hydra.launcher
    assert local._target_.endswith("submitit_launcher.LocalLauncher") and "n_jobs" not in local


def test_two_job_sweep_through_submitit_reads_back_with_the_report(tmp_path, capsys):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep = tmp_path / "sweep"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HYDRA_FULL_ERROR": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "efficient_attn_tasks.commands.train", "-m", "task=mqar", "model=tiny", "logger=none",
         *TINY_MQAR, *QUIET, "trainer.max_epochs=1", "test=false", "attention=softmax,linear",
         "hydra/launcher=local", f"hydra.sweep.dir={sweep}"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=240)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert "Submitit 'local' sweep output dir" in out.stdout + out.stderr  # the submitit launcher ran the jobs
    assert sorted(p.name for p in sweep.iterdir() if not p.name.startswith(".") and p.is_dir()) == \
        ["0_softmax", "1_linear"]  # configs/train.yaml hydra.sweep.subdir, as with any launcher
    assert list((sweep / ".submitit").iterdir())  # submitit's scripts and logs, beside the job dirs
    for job, attention in (("0_softmax", "softmax"), ("1_linear", "linear")):
        record = RunRecord.read(sweep / job / "results.json")
        assert record.status == "ok" and record.attention == attention and record.steps > 0
        assert (sweep / job / "checkpoints" / "last.ckpt").is_file()
    capsys.readouterr()
    report([str(sweep), "--rows", "attention"])
    table = capsys.readouterr().out
    assert re.search(r"^\| softmax \|", table, re.M) and re.search(r"^\| linear \|", table, re.M), table
