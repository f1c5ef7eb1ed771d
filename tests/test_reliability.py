"""Faults injected into real runs: DDP on 2 processes, bf16, fp16, failing jobs, bad input, first-week mistakes."""

import re
from typing import Callable

import pytest
import pytorch_lightning as pl
import torch

from efficient_attn import create_attention, list_attentions
from efficient_attn_tasks.config.checks import ConfigError, check_config
from efficient_attn_tasks.run.fit import run
from efficient_attn_tasks.run.record import RunError, RunRecord
from efficient_attn_tasks.tasks.sampling import eval_shard
from tests.helpers import LossLog, skip_unsupported
from tools import faults_inputs
from tools import faults_scenarios as faults

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
def test_ddp_two_gloo_processes_match_one_process_and_share_favor_features(tmp_path):
    result = faults.ddp_vs_single(tmp_path, steps=8)
    assert result["steps"] == 8
    assert result["max_abs_param_diff"] < 1e-5, result
    assert result["val_loss"][1] == pytest.approx(result["val_loss"][2], abs=1e-5)
    assert result["feature_mismatches"] == 0


@pytest.mark.slow
def test_ddp_translation_with_uneven_tokens_trains_and_decodes_as_one_process(tmp_path):
    result = faults.translation_ddp_vs_single(tmp_path, steps=6)  # float64; 4 and 3 sentences per process
    assert result["steps"] == 6 and result["processes"] == {"one": 1, "many": 2, "same_weights": 2}
    # global token normalisation: a mean of the processes' means moves the weights by ~1e-4 here
    assert result["max_abs_param_diff"] <= 1e-6, result
    assert result["train_tokens"]["many"] == result["train_tokens"]["one"]  # throughput counts every process
    assert result["val_loss"]["many"] == pytest.approx(result["val_loss"]["one"], abs=1e-6)
    # the 1-process run's best weights decoded on 2 processes: each decodes its share, gathered in corpus order
    assert result["same_weights_steps"] == 6
    assert result["test_sentences_per_process"] == [8, 7]  # batches (7, 7, 1) dealt out; no sentence twice
    assert result["same_hypotheses"] and result["hypotheses"] == 15
    assert result["test_bleu"]["same_weights"] == result["test_bleu"]["one"]
    assert result["test_loss"]["same_weights"] == result["test_loss"]["one"]


GRAD_TASKS = {  # tiny configs; 5 examples a global batch: 3 and 2 on two processes
    "translation": ["task=translation", "task.label_smoothing=0.1"],
    "lm": ["task=lm", "task.context_length=12"],
    "mqar": ["task=mqar", "task.vocab_size=32", "task.seq_len=16", "task.num_kv_pairs=3"],
    "listops": ["task=listops"],
}


def global_batch(task: str, cfg) -> tuple[list, Callable[[list], dict]]:
    """(5 seeded examples of ``task`` with unequal token counts, the task's collate)."""
    from efficient_attn_tasks.tasks import listops, mqar, translation_data

    g = torch.Generator().manual_seed(1)
    lengths = [3, 9, 4, 7, 2]
    if task == "translation":
        ids = lambda n: torch.randint(4, 40, (n,), generator=g).tolist()  # noqa: E731
        rows = [(ids(n), ids(n + i % 3), "") for i, n in enumerate(lengths)]  # source, target, reference
        return rows, translation_data.collate
    if task == "listops":
        rows = [(torch.randint(2, listops.VOCAB_SIZE, (n,), generator=g), i) for i, n in enumerate(lengths)]
        return rows, listops.collate
    if task == "lm":
        tokens = torch.randint(256, (5, 13), generator=g)
        return [{"tokens": t[:-1], "targets": t[1:]} for t in tokens], torch.utils.data.default_collate
    data = mqar.generate(mqar.task_config(cfg), 5, seed=1)
    return [{k: v[i] for k, v in data.items()} for i in range(5)], torch.utils.data.default_collate


def task_grads(task: str, rank: int = 0, world: int = 1) -> dict[str, torch.Tensor]:
    """Float64 gradients of ``task``'s training loss on this process's share ``[rank::world]`` of the
    global batch, averaged over the processes as DDP does."""
    import importlib

    cfg = faults.compose_config([*GRAD_TASKS[task], "model=tiny", "logger=none"])
    check_config(cfg)  # fills model.max_len from the task, as every run does
    torch.manual_seed(0)
    module_class = {"translation": "TranslationModule", "lm": "ByteLMModule", "mqar": "MQARModule",
                    "listops": "ListOpsModule"}[task]
    cls = getattr(importlib.import_module(f"efficient_attn_tasks.tasks.{task}"), module_class)
    module = (cls(cfg, 40, None) if task == "translation" else cls(cfg)).double()
    rows, collate = global_batch(task, cfg)
    module.training_step(collate(rows[rank::world]), 0).backward()
    grads = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
    if world > 1:
        for g in grads.values():
            torch.distributed.all_reduce(g)
            g /= world
    return grads


def _grads_on_rank(rank: int, world: int, store: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    grads = {task: task_grads(task, rank, world) for task in GRAD_TASKS}
    if rank == 0:
        torch.save(grads, out)
    torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # training_step without a Trainer
def test_every_task_normalises_its_loss_by_the_global_count_on_two_processes(tmp_path):
    """Uneven shares of one global batch (3 and 2 examples; tokens, queries, examples all unequal): the
    gradient DDP applies equals one process's on the whole batch; a mean of the processes' means would not."""
    out = tmp_path / "grads.pt"
    torch.multiprocessing.spawn(_grads_on_rank, args=(2, str(tmp_path / "store"), str(out)), nprocs=2)
    two = torch.load(out)
    for task in GRAD_TASKS:
        one = task_grads(task)
        assert one.keys() == two[task].keys() and len(one) > 10, task
        for name, g in one.items():
            torch.testing.assert_close(two[task][name], g, rtol=1e-9, atol=1e-12, msg=lambda m: f"{task} {name}: {m}")


def test_evaluation_shards_are_the_one_process_batches_dealt_out():
    one = eval_shard(15, 7)
    assert one == [list(range(0, 7)), list(range(7, 14)), [14]]
    assert eval_shard(15, 7, rank=0, world=2) == [one[0], one[2]] and eval_shard(15, 7, rank=1, world=2) == [one[1]]
    # fewer batches than processes: near-equal batches, one each (a process without one would hang the gather)
    assert [eval_shard(5, 8, rank=r, world=4) for r in range(4)] == [[[0]], [[1]], [[2]], [[3, 4]]]
    with pytest.raises(ValueError, match="3 examples cannot give each of 4 processes one"):
        eval_shard(3, 8, rank=0, world=4)


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


def test_fp16_gradient_overflow_is_skipped_by_the_scaler_counted_and_training_goes_on(tmp_path):
    """Initial scale 2**24 overflows the fp16 gradients for the first steps: the scaler skips them (halving
    its scale each time); the guard (nonfinite=stop) counts them apart instead of stopping the run."""
    r = faults.fp16_overflow(tmp_path, steps=12, init_scale=2.0**24)
    assert r["error"] is None and r["steps"] == 12 and r["precision"] == "16-mixed", r
    assert 0 < r["scaler_skipped_steps"] < 12 and r["skipped_updates"] == 0, r
    assert r["final_scale"] == r["init_scale"] * 0.5 ** r["scaler_skipped_steps"]  # each scaler skip counted once
    assert all(torch.isfinite(torch.tensor(r["losses"])))
    saved = RunRecord.read(tmp_path / "results.json")
    assert saved.scaler_skipped_steps == r["scaler_skipped_steps"] and saved.skipped_updates == 0


class PoisonWeights(pl.Callback):
    """Fills the first parameter with NaN before a given step: that step's loss is NaN."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(module.parameters()).fill_(float("nan"))


def test_fp16_nonfinite_loss_still_stops_the_run(tmp_path):
    r = faults.fp16_overflow(tmp_path, steps=12, init_scale=2.0**24, callbacks=[PoisonWeights(9)])
    assert r["error"] and "non-finite loss or gradient at step 9 with attention 'softmax'" in r["error"], r


def test_nonfinite_loss_stops_naming_step_and_attention(tmp_path):
    cfg = faults.compose_config([*faults.TINY, "trainer.max_steps=3", "optim.lr=1e30", "optim.warmup_steps=1"])
    with pytest.raises(FloatingPointError, match=r"step \d+ with attention 'softmax'") as err:
        run(cfg, tmp_path)
    record = RunRecord.read(tmp_path / "results.json")  # the failed record, with the step reached
    step = int(re.search(r"at step (\d+)", str(err.value)).group(1))
    assert step > 0 and record.steps == step and record.status == "failed" and record.metrics is None
    assert record.error == RunError("FloatingPointError", str(err.value))
    assert record.attention == "softmax" and record.config["optim"]["lr"] == 1e30 and record.seed == 0


# ----------------------------------------------------------------------------- a failing job of a sweep
@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["basic", "joblib"])
def test_one_failing_job_does_not_end_the_sweep(tmp_path, launcher):
    resume = launcher == "basic"  # resuming does not depend on the launcher
    # -m model.max_len=64,16,64: job 1 cannot build
    result = faults.sweep_with_a_failing_job(tmp_path, launcher, resume)
    assert result["statuses"] == {"0_softmax": "ok", "1_softmax": "failed", "2_softmax": "ok"}, result["output"]
    failed = result["failed"]["1_softmax"]
    assert failed["steps"] == 0 and failed["error"]["type"] == "ConfigError" and "model.max_len=16" in failed["error"][
        "message"] and "model.max_len=16" in failed["overrides"] and failed["config"]["model"]["max_len"] == 16
    assert result["returncode"] == 1, result["output"]  # after the summary
    job = tmp_path / "sweep" / "1_softmax"
    assert result["summary_failed"] == [f"{job}: ConfigError: {failed['error']['message']}"]
    if resume:  # ckpt_path=last with the same sweep dir runs the failed job again, and only that one
        assert result["rerun"] == ["1_softmax"] and result["resumed_returncode"] == 1
    rows = [line for line in result["report"].splitlines() if line.startswith("| softmax") or "(failed" in line]
    assert rows[0].startswith("| softmax / 64 | 2 |") and len(rows) == 2
    assert rows[1].startswith(f"| {tmp_path / 'sweep' / '1_softmax'} (failed at step 0: ConfigError: task listops:")


def test_a_failed_run_is_run_again_by_ckpt_path_last(tmp_path):
    overrides = [*faults.TINY, "trainer.max_steps=2"]
    with pytest.raises(ConfigError, match="raise model.max_len"):
        run(faults.compose_config([*overrides, "model.max_len=16"]), tmp_path)
    assert RunRecord.read(tmp_path / "results.json").status == "failed"
    log = LossLog()
    record = run(faults.compose_config([*overrides, "ckpt_path=last"]), tmp_path, callbacks=[log])
    assert record.status == "ok" and record.steps == 2 and len(log.losses) == 2
    assert RunRecord.read(tmp_path / "results.json") == record


def test_a_later_failure_never_replaces_a_finished_runs_record(tmp_path):
    first = run(faults.compose_config([*faults.TINY, "trainer.max_steps=2"]), tmp_path)
    with pytest.raises(ConfigError, match="is not a file"):
        run(faults.compose_config([*faults.TINY, f"ckpt_path={tmp_path / 'nope.ckpt'}"]), tmp_path)
    assert RunRecord.read(tmp_path / "results.json") == first and first.status == "ok"


# ----------------------------------------------------------------------------- bad input
@pytest.mark.slow
def test_every_bad_input_exits_with_a_one_line_message(tmp_path):
    for row in faults_inputs.bad_inputs(tmp_path):
        assert row["returncode"] == row["expected"], row
        assert row["message"] and "Traceback" not in row["message"], row


def test_a_missing_checkpoint_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="is not a file"):
        run(faults.compose_config([*faults.TINY, f"ckpt_path={tmp_path / 'nope.ckpt'}"]), tmp_path)
    record = RunRecord.read(tmp_path / "results.json")  # failed before training: step 0
    assert record.status == "failed" and record.steps == 0 and record.error.type == "ConfigError"


# ----------------------------------------------------------------------------- determinism
def test_same_seed_gives_bit_identical_losses_and_favor_features(tmp_path):
    overrides = [*faults.TINY, *faults.FAVOR, "model.dropout=0.1", "trainer.max_steps=7"]
    logs = [LossLog(), LossLog()]
    for i, log in enumerate(logs):
        run(faults.compose_config(overrides), tmp_path / str(i), callbacks=[log])
    assert logs[0].losses == logs[1].losses
    states = [torch.load(tmp_path / str(i) / "checkpoints" / "last.ckpt",
                         weights_only=False)["state_dict"] for i in (0, 1)]
    projections = [k for k in states[0] if k.endswith("projection")]
    assert projections and all(torch.equal(states[0][k], states[1][k]) for k in projections)


# ----------------------------------------------------------------------------- a user's first week
@pytest.mark.slow
def test_a_second_run_in_a_finished_runs_dir_is_refused_and_leaves_it_intact(tmp_path):
    r = faults_inputs.same_run_dir_twice(tmp_path)
    assert r["first_returncode"] == 0 and r["returncode"] == 2, r
    assert r["stderr"] == [f"error: run dir {tmp_path / 'run'} holds an earlier run (checkpoints/); resume it with "
                           "ckpt_path=last, replace it with overwrite=true, or choose another hydra.run.dir"]
    assert r["intact"] and r["hydra_files"] == [".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml"]
    assert "last.ckpt" in r["checkpoints"] and "last-v1.ckpt" not in r["checkpoints"]


@pytest.mark.slow
def test_ctrl_c_with_a_second_run_knocking_then_the_printed_command_finishes_the_run(tmp_path):
    r = faults_inputs.ctrl_c_and_resume(tmp_path, steps=400)
    # while the first run trains, the lock refuses a second run in its dir, in one line, before Hydra writes
    assert r["first_alive"] and r["live_returncode"] == 2 and r["hydra_intact"], r
    assert len(r["live_stderr"]) == 1 and re.fullmatch(r"error: run dir .+ is in use by another run \(pid \d+\)",
                                                       r["live_stderr"][0]), r
    # Ctrl-C: exit 130, one line naming the checkpoint and the command, an interrupted record at the saved step
    assert r["returncode"] == 130 and len(r["said"]) == 1, r
    assert r["status"] == "interrupted" and r["interrupted_steps"] == r["saved_step"] > 0, r
    assert " saved " in r["said"][0] and r["said"][0].endswith(" ".join(r["command"]))
    assert r["command"][0] == "efficient-attn-train" and r["command"][-1] == "ckpt_path=last"
    assert r["resumed_returncode"] == 0, r["resumed_output"]
    assert r["final_status"] == "ok" and r["final_steps"] == 400 and r["run_dirs"] == 1
    assert r["resumed_from"].endswith("checkpoints/last.ckpt")


FIRST_WEEK_LINES = {  # what each mistake's one line must say
    "lr": "error: optim.lr must be a number > 0, got -1",
    "other_task": "is a checkpoint of task 'lm', but this run's task is 'mqar'",
    "min_lenght": "error: unknown config key task.min_lenght; did you mean task.min_length=10?",
    "lrr": "error: unknown config key optim.lrr; did you mean optim.lr=1?",
    "favr": "error: attention=favr: no such config; did you mean one of attention=favor_",
    "experment": "error: unknown config key experment; did you mean experiment=quickstart?",
    "approx": "error: --checkpoint /no/such/path: no such checkpoint file or run dir",
    "prompt": "error: --prompt is empty",
}


@pytest.mark.slow
def test_each_first_week_mistake_is_one_line_exit_2_and_leaves_nothing(tmp_path):
    rows = faults_inputs.first_week_inputs(tmp_path)
    assert [r["key"] for r in rows] == list(FIRST_WEEK_LINES)
    for r in rows:
        assert r["returncode"] == 2 and r["lines"] == 1 and FIRST_WEEK_LINES[r["key"]] in r["message"], r
        assert r["run_dirs"] == 0 and not r["approx_out"], r


def test_the_first_week_rows_quote_a_before_for_each_mistake_and_state_the_after():
    same = {"returncode": 2, "seconds": 0.5, "stderr": ["error: run dir /w/run holds an earlier run"], "intact": True,
            "hydra_files": [".hydra/config.yaml"], "checkpoints": ["last.ckpt"], "run_dir": "/w/run"}
    stop = {"live_returncode": 2, "live_seconds": 1.0, "live_stderr": ["error: busy"], "first_alive": True,
            "hydra_intact": True, "max_steps": 400, "returncode": 130, "stop_seconds": 0.4,
            "said": ["interrupted at step 25 by SIGINT; saved /w/x/last.ckpt; resume with: efficient-attn-train a"],
            "stderr_lines": 1, "status": "interrupted", "interrupted_steps": 25, "saved_step": 25,
            "resumed_returncode": 0, "final_status": "ok", "final_steps": 400, "resumed_from": "/w/x/last.ckpt",
            "run_dirs": 1, "work": "/w"}
    inputs = [{"key": k, "command": f"efficient-attn-train {k}", "returncode": 2, "seconds": 0.5, "lines": 1,
               "message": "error: x", "run_dirs": 0, "approx_out": False} for k in FIRST_WEEK_LINES]
    rows = faults_inputs.first_week_rows(same, stop, inputs)
    assert len(rows) == 3 + len(FIRST_WEEK_LINES) and all(row.count(" | ") == 2 for row in rows)
    assert "intact, byte for byte" in rows[0] and "still training" in rows[1]
    assert "exit 130" in rows[2] and "`interrupted at step 25 by SIGINT; saved <work>/x/last.ckpt;" in rows[2]
    assert "exit 1 after 2.5 s, nothing printed, no results.json" in rows[2]
    assert all("be45d3d" in row for row in rows[3:]) and all("exit 2 after 0.50 s" in row for row in rows[3:])
    same["intact"], stop["first_alive"] = False, False
    rows = faults_inputs.first_week_rows(same, stop, inputs)
    assert "CHANGED" in rows[0] and "had ended" in rows[1]
