"""Faults injected into real runs: kill and resume, SIGTERM, DDP on 2 processes, bf16, bad input, determinism."""

import json
import re

import pytest
import torch

from efficient_attn import create_attention, list_attentions
from tasks import faults
from tasks.sampling import ShardedBatches, shuffled
from tasks.train import ConfigError, resume_argv, run
from tests.conftest import skip_unsupported
from tests.helpers import LossLog

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- sampling
def test_two_ranks_together_see_the_single_process_batches():
    batches = shuffled(50, 8, seed=3)
    one = list(ShardedBatches(batches, 7))
    ranks = [list(ShardedBatches(batches, 7, rank=r, world=2)) for r in range(2)]
    assert [sorted(a + b) for a, b in zip(*ranks)] == [sorted(b) for b in one if len(b) >= 2]
    assert not set(ranks[0][0]) & set(ranks[1][0])


def test_epochs_differ_and_resume_skips_the_trained_batches():
    sampler = ShardedBatches(shuffled(40, 8, seed=0), 5)
    epoch0, epoch1 = list(sampler), list(sampler)
    assert epoch0 != epoch1
    restarted = ShardedBatches(shuffled(40, 8, seed=0), 5)
    restarted.resume_at(epoch=1, batches=3)
    assert list(restarted) == epoch1[3:]
    assert list(restarted) == list(sampler)  # and the epoch after it is epoch 2, in both


# ----------------------------------------------------------------------------- resume
def test_sigkill_then_ckpt_path_last_reproduces_the_uninterrupted_losses(tmp_path):
    result = faults.resume_after_kill(tmp_path)  # FAVOR+ redrawn every 3 steps, dropout 0.1, 12 steps
    assert result["returncode"] == -9  # really killed
    assert result["resumed_at_step"] == 5 and result["steps"] == 12
    assert result["losses_resumed"] == result["losses_full"][5:]  # bit-identical, step by step


def test_sigterm_saves_and_the_same_command_continues_the_same_run_and_wandb_id(tmp_path):
    result = faults.resume_after_sigterm(tmp_path, steps=60)
    assert result["first_returncode"] == 143 and result["interrupt_message"], result
    assert result["second_returncode"] == 0, result["second_output"]
    assert result["run_dirs"] == 1 and result["steps"] == 60 and result["resumed_from"].endswith("last.ckpt")
    assert len(result["wandb_runs"]) == 2 and result["same_wandb_id"]


def test_ckpt_path_last_on_a_finished_run_does_not_train_again(tmp_path):
    overrides = [*faults.TINY, "trainer.max_steps=4"]
    first = run(faults.compose_config(overrides), tmp_path)
    log = LossLog()
    again = run(faults.compose_config([*overrides, "ckpt_path=last"]), tmp_path, callbacks=[log])
    assert again == first and log.losses == []


def test_resume_argv_finds_the_run_dir_of_the_same_overrides(tmp_path):
    old = tmp_path / "outputs" / "2026-01-01" / "10-00-00_listops_softmax"
    (old / "checkpoints").mkdir(parents=True)
    (old / ".hydra").mkdir()
    (old / ".hydra" / "overrides.yaml").write_text("- task=listops\n- seed=1\n")
    (old / "checkpoints" / "last.ckpt").write_bytes(b"")
    argv = ["seed=1", "task=listops", "ckpt_path=last"]
    assert resume_argv(argv, tmp_path / "outputs") == [*argv, f"hydra.run.dir={old}"]
    with pytest.raises(ConfigError, match="no run of these overrides"):
        resume_argv(["seed=2", "task=listops", "ckpt_path=last"], tmp_path / "outputs")
    assert resume_argv(["seed=2"], tmp_path / "outputs") == ["seed=2"]  # not resuming: unchanged


# ----------------------------------------------------------------------------- DDP
@pytest.mark.slow
def test_ddp_two_gloo_processes_match_one_process_and_share_favor_features(tmp_path):
    result = faults.ddp_vs_single(tmp_path, steps=8)
    assert result["steps"] == 8
    assert result["max_abs_param_diff"] < 1e-5, result
    assert result["val_loss"][1] == pytest.approx(result["val_loss"][2], abs=1e-5)
    assert result["feature_mismatches"] == 0


# ----------------------------------------------------------------------------- precision
@pytest.mark.parametrize("name", sorted(list_attentions()))
def test_bf16_large_norm_forward_backward_is_finite(name):
    attn = create_attention(name, head_dim=16, num_heads=2)
    q, k, v = (torch.randn(2, 2, 64, 16) * 6).requires_grad_(), torch.randn(2, 2, 64, 16) * 6, torch.randn(2, 2, 64, 16)
    skip_unsupported(name, lambda: attn(q, k, v))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(q, k, v)
    out.float().sum().backward()
    assert torch.isfinite(out.float()).all() and torch.isfinite(q.grad).all()


@pytest.mark.slow
def test_bf16_training_of_every_attention_config_has_no_nan(tmp_path):
    names = ["softmax", "dot", "additive", "bilinear", "favor_plus", "favor_relu", "linear"]
    results = faults.bf16_training(names, tmp_path, steps=6)
    for name, r in results.items():
        assert r["error"] is None and r["nonfinite_losses"] == 0 and r["skipped"] == 0, (name, r)


def test_nonfinite_loss_stops_naming_step_and_attention(tmp_path):
    cfg = faults.compose_config([*faults.TINY, "trainer.max_steps=3", "optim.lr=1e30", "optim.warmup_steps=1"])
    with pytest.raises(FloatingPointError, match=r"step \d+ with attention 'softmax'") as err:
        run(cfg, tmp_path)
    record = json.loads((tmp_path / "results.json").read_text())  # the failed record, with the step reached
    step = int(re.search(r"at step (\d+)", str(err.value)).group(1))
    assert step > 0 and record["steps"] == step and record["status"] == "failed" and "metrics" not in record
    assert record["error"] == {"type": "FloatingPointError", "message": str(err.value)}
    assert record["attention"] == "softmax" and record["config"]["optim"]["lr"] == 1e30 and record["seed"] == 0


# ----------------------------------------------------------------------------- a failing job of a sweep
@pytest.mark.parametrize("launcher", ["basic", pytest.param("joblib", marks=pytest.mark.slow)])
def test_one_failing_job_does_not_end_the_sweep(tmp_path, launcher):
    resume = launcher == "basic"  # resuming does not depend on the launcher
    result = faults.sweep_with_a_failing_job(tmp_path, launcher, resume)  # -m model.max_len=64,16,64: job 1 cannot build
    assert result["statuses"] == {"0_softmax": "ok", "1_softmax": "failed", "2_softmax": "ok"}, result["output"]
    failed = result["failed"]["1_softmax"]
    assert failed["steps"] == 0 and failed["error"]["type"] == "ConfigError" and "model.max_len=16" in failed["error"][
        "message"] and "model.max_len=16" in failed["overrides"] and failed["config"]["model"]["max_len"] == 16
    assert result["returncode"] == 1, result["output"]  # after the summary
    assert result["summary_failed"] == [f"{tmp_path / 'sweep' / '1_softmax'}: ConfigError: {failed['error']['message']}"]
    if resume:  # ckpt_path=last with the same sweep dir runs the failed job again, and only that one
        assert result["rerun"] == ["1_softmax"] and result["resumed_returncode"] == 1
    rows = [line for line in result["report"].splitlines() if line.startswith("| softmax") or "(failed" in line]
    assert rows[0].startswith("| softmax / 64 | 2 |") and len(rows) == 2
    assert rows[1].startswith(f"| {tmp_path / 'sweep' / '1_softmax'} (failed at step 0: ConfigError: task.listops:")


def test_a_failed_run_is_run_again_by_ckpt_path_last(tmp_path):
    overrides = [*faults.TINY, "trainer.max_steps=2"]
    with pytest.raises(ConfigError, match="raise model.max_len"):
        run(faults.compose_config([*overrides, "model.max_len=16"]), tmp_path)
    assert json.loads((tmp_path / "results.json").read_text())["status"] == "failed"
    log = LossLog()
    record = run(faults.compose_config([*overrides, "ckpt_path=last"]), tmp_path, callbacks=[log])
    assert record["status"] == "ok" and record["steps"] == 2 and len(log.losses) == 2
    assert json.loads((tmp_path / "results.json").read_text()) == record


def test_a_later_failure_never_replaces_a_finished_runs_record(tmp_path):
    first = run(faults.compose_config([*faults.TINY, "trainer.max_steps=2"]), tmp_path)
    with pytest.raises(ConfigError, match="is not a file"):
        run(faults.compose_config([*faults.TINY, f"ckpt_path={tmp_path / 'nope.ckpt'}"]), tmp_path)
    assert json.loads((tmp_path / "results.json").read_text()) == first and first["status"] == "ok"


# ----------------------------------------------------------------------------- bad input
@pytest.mark.slow
def test_every_bad_input_exits_with_a_one_line_message(tmp_path):
    for row in faults.bad_inputs(tmp_path):
        assert row["returncode"] == row["expected"], row
        assert row["message"] and "Traceback" not in row["message"], row


def test_a_missing_checkpoint_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="is not a file"):
        run(faults.compose_config([*faults.TINY, f"ckpt_path={tmp_path / 'nope.ckpt'}"]), tmp_path)
    record = json.loads((tmp_path / "results.json").read_text())  # failed before training: step 0
    assert record["status"] == "failed" and record["steps"] == 0 and record["error"]["type"] == "ConfigError"


# ----------------------------------------------------------------------------- determinism
def test_same_seed_gives_bit_identical_losses_and_favor_features(tmp_path):
    overrides = [*faults.TINY, *faults.FAVOR, "model.dropout=0.1", "trainer.max_steps=7"]
    logs = [LossLog(), LossLog()]
    for i, log in enumerate(logs):
        run(faults.compose_config(overrides), tmp_path / str(i), callbacks=[log])
    assert logs[0].losses == logs[1].losses
    states = [torch.load(tmp_path / str(i) / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"] for i in (0, 1)]
    projections = [k for k in states[0] if k.endswith("projection")]
    assert projections and all(torch.equal(states[0][k], states[1][k]) for k in projections)
