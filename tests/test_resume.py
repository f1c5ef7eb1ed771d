"""Sampling and resume: the data position of each checkpoint, kill or SIGTERM then resume, last.ckpt at validation."""

import json
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
from pytorch_lightning.utilities.exceptions import SIGTERMException

from efficient_attn_tasks.config.checks import ConfigError
from efficient_attn_tasks.run.callbacks import WallClock
from efficient_attn_tasks.run.curves import read_curves
from efficient_attn_tasks.run.fit import run
from efficient_attn_tasks.run.record import RESULTS_JSON, Attempt
from efficient_attn_tasks.run.resume import resume_argv
from efficient_attn_tasks.tasks.sampling import ShardedBatches, shuffled
from tests.helpers import LossLog
from tools import faults_scenarios as faults

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
@pytest.mark.slow
def test_sigkill_then_ckpt_path_last_reproduces_the_uninterrupted_losses(tmp_path):
    result = faults.resume_after_kill(tmp_path)  # FAVOR+ redrawn every 3 steps, dropout 0.1, 12 steps
    assert result["returncode"] == -9  # really killed
    assert result["resumed_at_step"] == 5 and result["steps"] == 12
    assert result["losses_resumed"] == result["losses_full"][5:]  # bit-identical, step by step


@pytest.mark.slow
def test_sigterm_saves_and_the_same_command_continues_the_same_run_and_wandb_id(tmp_path):
    result = faults.resume_after_sigterm(tmp_path, steps=60)
    assert result["first_returncode"] == 143 and result["interrupt_message"], result
    assert result["second_returncode"] == 0, result["second_output"]
    assert result["run_dirs"] == 1 and result["steps"] == 60 and result["resumed_from"].endswith("last.ckpt")
    assert len(result["wandb_runs"]) == 2 and result["same_wandb_id"]


class Slow(pl.Callback):
    """Sleeps ``seconds`` after every training step."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        time.sleep(self.seconds)


def test_a_resumed_run_records_the_wall_time_of_its_earlier_attempts(tmp_path):
    # attempt 1 sleeps 0.3 s a step and is stopped at step 5, where last.ckpt saves its clock; attempt 2 resumes and
    # is stopped at step 6; attempt 3 resumes to step 8 and tests the best checkpoint. Each record counts the
    # earlier attempts up to the checkpoint it resumed from, then its own seconds.
    overrides = [*faults.TINY, "trainer.max_steps=8", "test=true"]

    def clock() -> float:
        saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        return saved["callbacks"]["WallClock"]["seconds"]

    with pytest.raises(SIGTERMException):
        run(faults.compose_config(overrides), tmp_path, callbacks=[Slow(0.3), StopAt(5)])
    first = clock()
    assert 1.5 <= first <= json.loads((tmp_path / RESULTS_JSON).read_text())["wall_time_s"]
    with pytest.raises(SIGTERMException):
        run(faults.compose_config([*overrides, "ckpt_path=last"]), tmp_path, callbacks=[StopAt(6)])
    second = clock()
    assert first < second <= json.loads((tmp_path / RESULTS_JSON).read_text())["wall_time_s"]
    cfg = faults.compose_config([*overrides, "ckpt_path=last"])
    start = time.perf_counter()
    record = run(cfg, tmp_path)
    third = time.perf_counter() - start
    assert record.resumed_from and record.steps == 8
    assert second < record.wall_time_s < second + third


def test_only_fit_restores_the_wall_clock():
    # test(ckpt_path) and validate(ckpt_path) load a checkpoint's callback states too: this attempt's seconds
    # would then count twice
    attempt = Attempt(time.perf_counter())
    clock = WallClock(attempt)
    clock.setup(None, None, "fit")
    clock.load_state_dict({"seconds": 100.0})
    assert attempt.before == 100.0 and 100.0 <= clock.state_dict()["seconds"] < 101.0
    for stage in ("test", "validate"):
        clock.setup(None, None, stage)
        clock.load_state_dict({"seconds": 500.0})
        assert attempt.before == 100.0


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


class StopAt(pl.Callback):
    """SIGTERM's stop at the end of step ``step`` (SaveOnInterrupt saves last.ckpt there), raised in-process."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise SIGTERMException


def positions(checkpoints: Path) -> dict[str, tuple[int, int, int]]:
    """``{file name: (global_step, epoch, batches)}`` of every checkpoint in ``checkpoints``."""
    out = {}
    for path in sorted(checkpoints.glob("*.ckpt")):
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        out[path.name] = (ckpt["global_step"], ckpt["data_position"]["epoch"], ckpt["data_position"]["batches"])
    return out


def test_every_checkpoint_of_a_twice_resumed_run_holds_the_data_position_of_its_step(tmp_path):
    # 8 batches an epoch, one process, no accumulation: a checkpoint of step s is at epoch s // 8, batch s % 8.
    # Stopped mid-epoch 0 (step 5), resumed, stopped mid-epoch 1 (step 11), resumed to step 20: each resumed run
    # saves checkpoints mid-epoch, at the end of the epoch it resumed in (validation) and in later epochs.
    overrides = [*faults.TINY, "trainer.max_steps=20"]
    every = tmp_path / "every"
    seen = {}
    for stop in (5, 11, None):
        keep = ModelCheckpoint(dirpath=every, every_n_train_steps=1, save_top_k=-1, filename="{step}")
        callbacks = [keep] if stop is None else [keep, StopAt(stop)]
        cfg = faults.compose_config([*overrides, *(["ckpt_path=last"] if seen else [])])
        if stop is None:
            assert run(cfg, tmp_path / "run", callbacks=callbacks).steps == 20
        else:
            with pytest.raises(SIGTERMException):
                run(cfg, tmp_path / "run", callbacks=callbacks)
        for where in (every, tmp_path / "run" / "checkpoints"):  # last.ckpt and best-step=N.ckpt too
            seen.update({f"{where.name}/{k} after {stop}": v for k, v in positions(where).items()})
    assert len(seen) > 20
    wrong = {name: p for name, p in seen.items() if p[0] != p[1] * 8 + p[2]}
    assert not wrong, wrong
    # every attempt's newest checkpoint is last.ckpt, the one ckpt_path=last resumes from (no last-v1.ckpt beside it)
    assert {k: v[0] for k, v in positions(tmp_path / "run" / "checkpoints").items() if "last" in k} == \
        {"last.ckpt": 20}


def test_a_checkpoint_whose_data_position_disagrees_with_its_loop_resumes_where_the_loop_stands(tmp_path, capsys):
    # An end-of-epoch checkpoint (step 8, validated) whose data position says epoch 0, 3 batches trained (as a
    # counter that lost the batches before a restart wrote it): resumed, the run must train the whole of epoch 1,
    # validate at its end (early stopping needs the metric there) and say once that it trusted the loop.
    # Epochs bound the run, as in the MQAR sweeps (a step bound makes Lightning replay the epoch's end on restart).
    overrides = [*faults.TINY, "trainer.max_epochs=2"]
    full = LossLog()
    run(faults.compose_config(overrides), tmp_path / "full", callbacks=[full])
    run(faults.compose_config([*faults.TINY, "trainer.max_epochs=1"]), tmp_path / "run")
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 8 and ckpt["data_position"] == {"epoch": 1, "batches": 0}
    ckpt["data_position"] = {"epoch": 0, "batches": 3}
    torch.save(ckpt, last)
    (tmp_path / "run" / RESULTS_JSON).rename(tmp_path / "run" / "results.first.json")  # run on, as a sweep's rerun
    capsys.readouterr()
    resumed = LossLog()
    stop = EarlyStopping(monitor="val/acc", mode="max", patience=5)
    record = run(faults.compose_config([*overrides, "ckpt_path=last"]), tmp_path / "run", callbacks=[resumed, stop])
    assert record.status == "ok" and record.steps == 16
    assert read_curves(tmp_path / "run" / "curves.csv")["val/acc"][0] == [8, 16]
    assert resumed.losses == full.losses[8:]  # the batches of epoch 1, bit-identical
    said = [ln for ln in capsys.readouterr().err.splitlines() if "data position" in ln]
    assert said == ["warning: checkpoint last.ckpt: data position epoch 0, 3 batches disagrees with its training "
                    "loop (epoch 1, 0 batches); resuming where the loop stands"]



class SaveAtEnd(pl.Callback):
    """Save a checkpoint to ``path`` once the fit loop has ended (as ModelCheckpoint's ``save_last`` may)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_end(self, trainer, module) -> None:
        trainer.save_checkpoint(self.path)


def test_a_run_extended_past_its_max_steps_trains_the_batches_of_the_longer_run(tmp_path):
    # stopped at step 20, mid-epoch 2 (8 batches an epoch): the ended fit loop counts that epoch as completed; the
    # data position stays in it, so going on to step 28 trains epoch 2's last 4 batches, as the 28-step run did
    longer, extended = LossLog(), LossLog()
    run(faults.compose_config([*faults.TINY, "trainer.max_steps=28"]), tmp_path / "longer", callbacks=[longer])
    end = tmp_path / "end.ckpt"
    run(faults.compose_config([*faults.TINY, "trainer.max_steps=20"]), tmp_path / "run", callbacks=[SaveAtEnd(end)])
    ckpt = torch.load(end, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 20 and ckpt["data_position"] == {"epoch": 2, "batches": 4}
    record = run(faults.compose_config([*faults.TINY, "trainer.max_steps=28", f"ckpt_path={end}"]), tmp_path / "more",
                 callbacks=[extended])
    assert record.steps == 28 and extended.losses == longer.losses[20:]


# ----------------------------------------------------------------------------- DDP


def test_last_checkpoint_follows_every_validation_not_only_the_best(tmp_path):
    # lr ~ 0: the validation metric never improves after the first epoch, so the best checkpoint stays at step 8
    # and Lightning's own save_last would keep last.ckpt there too
    cfg = faults.compose_config([*faults.TINY, "trainer.max_steps=24", "optim.lr=1e-12", "optim.warmup_steps=0"])
    assert run(cfg, tmp_path / "run").steps == 24
    steps = {k: v[0] for k, v in positions(tmp_path / "run" / "checkpoints").items()}
    assert steps == {"best-step=8.ckpt": 8, "last.ckpt": 24}, steps


def test_early_stopping_run_resumed_from_an_epoch_end_checkpoint_trains_on_as_the_uninterrupted_run(tmp_path):
    # Lightning replays on_train_epoch_end of the checkpoint's epoch before any validation in the new process
    def stop() -> EarlyStopping:
        return EarlyStopping(monitor="val/acc", mode="max", patience=5)

    full = LossLog()
    run(faults.compose_config([*faults.TINY, "trainer.max_steps=16"]), tmp_path / "full", callbacks=[full, stop()])
    run(faults.compose_config([*faults.TINY, "trainer.max_steps=8"]), tmp_path / "run", callbacks=[stop()])
    (tmp_path / "run" / RESULTS_JSON).rename(tmp_path / "run" / "results.first.json")  # run on, as a longer run
    resumed = LossLog()
    record = run(faults.compose_config([*faults.TINY, "trainer.max_steps=16", "ckpt_path=last"]), tmp_path / "run",
                 callbacks=[resumed, stop()])
    assert record.status == "ok" and record.steps == 16
    assert resumed.losses == full.losses[8:]
