"""The training app: every config composes and checks, every task × attention runs a fast_dev_run
through the real config path, translation learns, resume continues, the record says what ran."""

import math
import mmap
import os
import re
import subprocess
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

import efficient_attn as ea
from efficient_attn.attention.base import unsupported_use
from efficient_attn.transformer import SITE_USE, AttentionSpec
from efficient_attn_tasks.config.checks import ConfigError, check_config
from efficient_attn_tasks.run.curves import read_curves
from efficient_attn_tasks.run.fit import run
from efficient_attn_tasks.run.machine import peak_memory_mib, reset_peak_memory
from efficient_attn_tasks.run.record import RunRecord
from efficient_attn_tasks.tasks import task_module
from tests.helpers import QUIET, SHARED_DATA, LossLog, config, config_files, site_specs, tiny_cfg

pytestmark = pytest.mark.usefixtures("one_thread")

needs_data = pytest.mark.skipif(not SHARED_DATA.exists(), reason="needs ../shared/data")


def cannot_run(task: str, attention: str) -> str | None:
    """Why configs/attention/<attention>.yaml cannot serve an attention site of the task's model (a
    causal-only variant is no encoder, a self-attention-only one no cross-attention), or None. A
    per-layer hybrid (``layers``, e.g. based) serves self-attention sites only, each layer checked."""
    chosen = config(f"attention={attention}").attention
    sites = task_module(task).ATTENTION_SITES
    names = [chosen.name] if chosen.get("layers") is None else [layer.name for layer in chosen.layers]
    if chosen.get("layers") is not None and "cross" in sites:
        return "is a per-layer hybrid of self-attentions; cross-attention takes one attention"
    problems = [unsupported_use(ea.get_attention_class(name), **SITE_USE[site]) for name in names for site in sites]
    return next((p for p in problems if p), None)


@pytest.mark.parametrize("group", ["task", "attention", "model", "trainer", "logger", "callbacks", "experiment"])
def test_every_config_file_composes_and_checks(group):
    files = config_files(group)
    assert files, f"configs/{group}/ is empty"
    for name in files:
        cfg = config(f"{group}={name}")
        if group == "attention" and cannot_run(cfg.task.name, name):  # refused clearly; checked on a decoder-only task
            with pytest.raises(ConfigError, match=re.escape(cannot_run(cfg.task.name, name))):
                check_config(cfg)
            cfg = config(f"{group}={name}", "task=lm")
        check_config(cfg)
        if group == "attention":  # one registered attention, or a hybrid whose every layer is one
            layers = cfg.attention.get("layers") or [cfg.attention]
            assert {layer.name for layer in layers} <= set(ea.list_attentions())


def task_attention_pairs() -> list:
    """Every task × attention config. The default tier runs every task with FAVOR+ and every attention on
    MQAR (the fastest task; FAVOR+ variants that differ only in numbers are left to the slow tier)."""
    numbers_only = {"favor_m16", "favor_m64", "favor_iid", "favor_fixed", "favor_m64_fixed", "sliding_window_w16"}
    return [pytest.param(task, attention, marks=() if attention == "favor_plus" or (
                task == "mqar" and attention not in numbers_only) else pytest.mark.slow)
            for task in ("translation", "listops", "lm", "mqar") for attention in config_files("attention")]


@pytest.mark.parametrize("task, attention", task_attention_pairs())
def test_fast_dev_run_every_task_and_attention(tmp_path, task, attention):
    """Every configs/task × configs/attention pair: with the defaults (the task's own lengths, the default
    model) it passes every start check, model.max_len following the task; then one step of each on tiny
    data (model=tiny, small sizes; model.max_len never set). A pair refused by design (a causal-only
    attention as an encoder, a self-attention-only one as cross-attention) must be that clear error."""
    problem = cannot_run(task, attention)
    if problem:  # the config check refuses it, naming the reason, at the defaults and tiny alike
        for cfg in (config(f"task={task}", f"attention={attention}"), tiny_cfg(task, attention)):
            with pytest.raises(ConfigError, match=re.escape(problem)):
                check_config(cfg)
        return
    defaults = config(f"task={task}", f"attention={attention}")
    check_config(defaults)
    schema = task_module(task).Config(**OmegaConf.to_container(defaults.task, resolve=True))
    assert defaults.model.max_len == getattr(schema, "default_max_len", getattr(schema, "longest_sequence", None))
    if task == "lm" and not SHARED_DATA.exists():
        pytest.skip("needs ../shared/data")
    record = run(tiny_cfg(task, attention, "++trainer.fast_dev_run=true"), tmp_path)
    assert record.attention == config(f"attention={attention}").attention.name
    assert record.attention_config == attention
    assert record.num_parameters > 0 and record.train_tokens_per_s > 0
    saved = RunRecord.read(tmp_path / "results.json")
    assert saved.config["task"]["name"] == task and saved.metrics.test
    assert set(saved.versions) >= {"torch", "pytorch-lightning"} and saved.hardware


@pytest.mark.parametrize("attention", [a if a == "favor" else pytest.param(a, marks=pytest.mark.slow)
                                       for a in ea.list_attentions()])  # FAVOR+ in the default tier
def test_translation_loss_falls(tmp_path, attention):
    """``attention`` at every site it can serve; softmax at the others (a causal-only variant trains
    as the decoder's self-attention, a self-attention-only one not as cross-attention)."""
    log = LossLog()
    softmax_sites = [f"++model.{site}_attention={{name: softmax, kwargs: {{}}}}"
                     for site, spec in site_specs(AttentionSpec(attention)).items() if spec.name != attention]
    cfg = config("experiment=quickstart", f"attention={'favor_plus' if attention == 'favor' else attention}",
                 "logger=none", "task.synthetic_sizes=[2560,16,16]", "trainer.max_epochs=1", "test=false",
                 "trainer.limit_val_batches=0", "optim.warmup_steps=5", "optim.schedule=constant", *softmax_sites,
                 *QUIET)
    run(cfg, tmp_path, callbacks=[log])
    assert len(log.losses) == 40 and log.fell(), log.losses


def test_resume_continues_at_the_saved_step(tmp_path):
    first = run(tiny_cfg("listops", "softmax", "trainer.max_epochs=1", "test=false"), tmp_path / "a")
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    assert first.steps == 4 and last.exists()
    log = LossLog()
    resumed = run(tiny_cfg("listops", "softmax", "trainer.max_epochs=2", "test=false", f"ckpt_path={last}"),
                  tmp_path / "b", callbacks=[log])
    assert resumed.steps == 8 and len(log.losses) == 4  # only the second epoch was trained
    assert read_curves(tmp_path / "b" / "curves.csv")["val/acc"][0] == [4, 8]  # the curves came with the checkpoint


def test_results_record_the_best_checkpoint_and_test_uses_it(tmp_path):
    record = run(tiny_cfg("listops", "softmax", "trainer.max_epochs=2"), tmp_path)
    best = record.metrics.best_checkpoint
    assert best and Path(best).exists() and "best" in Path(best).name
    assert record.metrics.monitor == "val/acc" and record.metrics.val_best is not None
    step = int(re.search(r"step=(\d+)", Path(best).name).group(1))  # ModelCheckpoint's filename="best-{step}"
    tested = {"checkpoint": "best", "path": best, "step": step}
    assert record.metrics.test_checkpoint == tested
    assert RunRecord.read(tmp_path / "results.json") == record


def test_without_validation_the_test_says_it_used_the_last_weights(tmp_path, capsys):
    record = run(tiny_cfg("listops", "softmax", "trainer.max_steps=3", "trainer.limit_val_batches=0"), tmp_path)
    last = {"checkpoint": "last", "path": None, "step": 3}
    assert record.metrics.best_checkpoint is None and record.metrics.test
    assert record.metrics.test_checkpoint == last
    assert RunRecord.read(tmp_path / "results.json") == record
    out, err = capsys.readouterr()
    assert "warning: no best checkpoint (validation never ran); testing the last weights, step 3" in err
    assert "(last weights: no best checkpoint)" in out


class ValidationSteps(pl.Callback):
    """The global step of every validation run (not the sanity check)."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_validation_end(self, trainer, module) -> None:
        if not trainer.sanity_checking:
            self.steps.append(trainer.global_step)


@pytest.mark.parametrize("max_steps, validated", [(3, [3]), (4, [4]), (6, [4, 6])])
def test_max_steps_ending_mid_epoch_validates_and_checkpoints_the_last_step(tmp_path, max_steps, validated):
    """4 steps per epoch, validation at each epoch's end; a max_steps run also validates at its last step
    (ValidateAtMaxSteps), once when that is an epoch's end. max_steps=3 validates only there, so the best
    checkpoint, and the test, are that step's."""
    seen = ValidationSteps()
    record = run(tiny_cfg("listops", "softmax", f"trainer.max_steps={max_steps}"), tmp_path, callbacks=[seen])
    assert record.steps == max_steps and seen.steps == validated
    if validated == [3]:
        assert Path(record.metrics.best_checkpoint).name == "best-step=3.ckpt"
        assert record.metrics.test_checkpoint["checkpoint"] == "best"
        assert record.metrics.test_checkpoint["step"] == 3


def test_translation_test_bleu_is_never_silently_absent(tmp_path):
    """beam_size=0 is refused (it would skip test decoding: no test/bleu in results.json); 1 is greedy."""
    with pytest.raises(ConfigError, match=r"task.beam_size must be an int >= 1 \(1 = greedy"):
        run(tiny_cfg("translation", "softmax", "task.beam_size=0", "trainer.max_steps=1"), tmp_path / "zero")
    failed = RunRecord.read(tmp_path / "zero" / "results.json")  # the failed record, no metrics
    assert failed.status == "failed" and failed.metrics is None
    record = run(tiny_cfg("translation", "softmax", "task.beam_size=1", "trainer.max_steps=2"), tmp_path / "greedy")
    assert "test/bleu" in record.metrics.test and record.bleu_signature


class LearningRates(pl.Callback):
    """Records the ``train/lr`` the module logged at every training step."""

    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.lrs.append(float(trainer.callback_metrics["train/lr"]))


def test_learning_rate_is_logged_every_step(tmp_path):
    lrs = LearningRates()
    run(tiny_cfg("listops", "softmax", "trainer.max_steps=3", "test=false", "trainer.limit_val_batches=0",
             "optim.lr=1e-3", "optim.warmup_steps=2", "optim.schedule=constant"), tmp_path, callbacks=[lrs])
    assert lrs.lrs == pytest.approx([5e-4, 1e-3, 1e-3])  # warm-up 1/2, 2/2, then constant


@pytest.mark.parametrize("trainer, finite", [
    (dict(max_epochs=-1, max_steps=-1, max_time="00:01:00:00"), False),  # a time budget only
    (dict(max_epochs=None, max_steps=-1, max_time="00:01:00:00"), False),  # Lightning: no epoch limit either
    (dict(max_epochs=-1, max_steps=-1), False),
    (dict(max_epochs=-1, max_steps=500, max_time="00:01:00:00"), True),
    (dict(max_epochs=3, max_steps=-1), True),
    (dict(max_epochs=None, max_steps=-1), True),  # Lightning's default: 1000 epochs
    (dict(max_epochs=-1, max_steps=-1, fast_dev_run=True), True),
])
def test_cosine_needs_a_step_horizon(trainer, finite):
    """A time budget alone (``max_epochs=-1`` with ``max_time``) is no step horizon for the schedule
    (its length would be float infinity)."""
    from efficient_attn_tasks.config.checks import has_step_horizon

    assert has_step_horizon(trainer) is finite
    extra = [f"++trainer.{key}={'null' if value is None else value}" for key, value in trainer.items()]
    if finite:
        check_config(tiny_cfg("listops", "softmax", "optim.schedule=cosine", *extra))
    else:
        with pytest.raises(ConfigError, match=re.escape("optim.schedule=cosine needs a finite horizon: set "
                                                        "trainer.max_steps")):
            check_config(tiny_cfg("listops", "softmax", "optim.schedule=cosine", *extra))
        check_config(tiny_cfg("listops", "softmax", "optim.schedule=inverse_sqrt", *extra))  # only cosine needs it


def test_cosine_horizon_is_the_trainers_step_count():
    """The schedule reads its horizon from the trainer (max_steps, or epochs × batches); none is an error."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from efficient_attn_tasks.tasks.base import TaskModule

    optim = dict(lr=1.0, weight_decay=0.0, betas=[0.9, 0.98], warmup_steps=0, schedule="cosine")
    module = TaskModule(OmegaConf.create({"optim": optim}))
    module._trainer = SimpleNamespace(estimated_stepping_batches=100)
    assert module._lr_factor(0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 100)))
    assert module._lr_factor(49) == pytest.approx(0.5) and module._lr_factor(99) == pytest.approx(0.0)
    module._trainer = SimpleNamespace(estimated_stepping_batches=float("inf"))
    with pytest.raises(ConfigError, match="set trainer.max_steps"):
        module._lr_factor(0)


def test_cosine_total_steps_overrides_the_trainers_horizon():
    """``optim.total_steps`` sets the horizon: a run stopped at ``max_steps`` follows a longer run's schedule,
    and a time-budget run (no step count) can use cosine."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from efficient_attn_tasks.tasks.base import TaskModule

    optim = dict(lr=1.0, weight_decay=0.0, betas=[0.9, 0.98], warmup_steps=0, schedule="cosine", total_steps=400)
    module = TaskModule(OmegaConf.create({"optim": optim}))
    module._trainer = SimpleNamespace(estimated_stepping_batches=100)
    assert module._lr_factor(199) == pytest.approx(0.5) and module._lr_factor(99) > 0.8
    check_config(tiny_cfg("listops", "softmax", "optim.schedule=cosine", "optim.total_steps=400",
                      "++trainer.max_epochs=-1", "++trainer.max_steps=-1", "++trainer.max_time=00:01:00:00"))
    with pytest.raises(ConfigError, match="optim.total_steps must be null or an int >= 1"):
        check_config(tiny_cfg("listops", "softmax", "optim.total_steps=0"))


def test_default_listops_runs_with_the_default_model(tmp_path):
    """``task=listops attention=softmax`` builds: ListOps reaches 1999 tokens, and model.max_len follows
    the task. Default lengths and model; only the dataset sizes are small."""
    record = run(config("task=listops", "attention=softmax", "logger=none", "task.train_size=2", "task.val_size=2",
                        "task.test_size=2", "task.batch_size=2", "++trainer.fast_dev_run=true", *QUIET), tmp_path)
    assert record.config["model"]["max_len"] == 1999 and record.steps == 1


@pytest.mark.parametrize("model", [m if m == "tiny" else pytest.param(m, marks=pytest.mark.slow)
                                   for m in config_files("model")])
def test_model_max_len_follows_the_task_unless_set(model):
    """model.max_len: null (every model group) = the task's longest sequence (translation: 1024, or BOS +
    max_tokens if more); a number is kept, and one below a length the task's config fixes is a start error
    (translation's lengths are checked on the data)."""
    expected = {("listops",): 1999, ("listops", "task.pooling=cls"): 2000, ("lm",): 1024, ("mqar",): 64,
                ("mqar", "task.seq_len=128"): 128, ("translation",): 1024,
                ("translation", "task.max_tokens=2000"): 2001}
    for (task, *extra), max_len in expected.items():
        cfg = config(f"task={task}", f"model={model}", *extra)
        assert cfg.model.max_len is None
        check_config(cfg)
        assert cfg.model.max_len == max_len, (task, extra)
    cfg = config("task=listops", "attention=cosformer", f"model={model}")
    check_config(cfg)
    assert cfg.attention.kwargs.max_len is None  # cosFormer's M: each call's sequence length
    cfg = config("task=lm", f"model={model}", "model.max_len=2048")
    check_config(cfg)
    assert cfg.model.max_len == 2048
    for task, short, key in (("listops", 1024, "task.max_length"), ("lm", 512, "task.context_length"),
                             ("mqar", 32, "task.seq_len")):
        with pytest.raises(ConfigError, match=rf"task {task}: sequences reach \d+ tokens \({re.escape(key)}.*"
                                              rf"model.max_len={short}; raise model.max_len to >= \d+"):
            check_config(config(f"task={task}", f"model={model}", f"model.max_len={short}"))
    check_config(config("task=translation", f"model={model}", "model.max_len=64"))  # checked on the tokenised data



def test_wandb_logger_runs_disabled_with_dirs_in_temp(tmp_path):
    assert os.environ["WANDB_MODE"] == "disabled"
    record = run(tiny_cfg("listops", "softmax", "logger=wandb", "++trainer.fast_dev_run=true"), tmp_path)
    assert record.config["logger"]["kind"] == "wandb"
    import wandb

    assert wandb.run is None  # finished, so the next multirun job starts its own run


@pytest.mark.slow
@needs_data
def test_quickstart_multirun_prints_a_side_by_side_summary(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    cmd = ["efficient-attn-train", "-m", "experiment=quickstart", "attention=softmax,linear",
           "task.synthetic_sizes=[64,16,16]", "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
           f"hydra.sweep.dir={tmp_path}"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert len(list(tmp_path.glob("*/results.json"))) == 2
    table = out.stdout[out.stdout.index("2 run(s) in"):]
    assert "| attention | n | test/bleu | tokens/s | peak MiB | wall s |" in table
    assert table.index("| softmax | 1 |") < table.index("| linear | 1 |")  # launch order
    assert f"efficient-attn-report {tmp_path} --rows attention --ci" in table


def test_wandb_online_start_without_network_or_valid_key_falls_back_to_offline(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)  # looks logged in, but the key is bad / the host unreachable
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = tiny_cfg("listops", "softmax", "logger=wandb", "logger.init_timeout=3", "++trainer.fast_dev_run=true")
    with pytest.warns(UserWarning, match="logging offline instead"):
        run(cfg, tmp_path / "run")
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))


class PoisonGradient(pl.Callback):
    """Makes one gradient NaN at a given step (after backward, before the guard looks)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_after_backward(self, trainer, module) -> None:
        if trainer.global_step == self.step:
            next(p for p in module.parameters() if p.grad is not None).grad.fill_(float("nan"))


def test_nonfinite_gradient_stops_the_run_naming_step_and_attention(tmp_path):
    cfg = tiny_cfg("listops", "favor_plus", "trainer.max_epochs=1", "test=false")
    with pytest.raises(FloatingPointError, match=r"non-finite loss or gradient at step 2 with attention 'favor'"):
        run(cfg, tmp_path, callbacks=[PoisonGradient(2)])


def test_nonfinite_update_is_skipped_when_configured(tmp_path):
    log = LossLog()
    cfg = tiny_cfg("listops", "softmax", "trainer.max_epochs=1", "test=false", "nonfinite=skip")
    record = run(cfg, tmp_path, callbacks=[PoisonGradient(2), log])
    assert record.skipped_updates == 1 and all(torch.isfinite(torch.tensor(log.losses)))


def test_same_seed_gives_bit_identical_losses_including_favor_redraws(tmp_path):
    def losses(seed: int, name: str) -> list[float]:
        log = LossLog()
        cfg = tiny_cfg("listops", "favor_plus", "trainer.max_epochs=1", "test=false", f"seed={seed}",
                   "attention.kwargs.redraw_interval=2", "model.dropout=0.1")
        run(cfg, tmp_path / name, callbacks=[log])
        return log.losses

    first = losses(0, "a")
    assert losses(0, "b") == first
    assert losses(1, "c") != first


def test_peak_memory_is_per_run_not_per_process(tmp_path):
    # An anonymous mapping, not a tensor: a heap block freed by earlier tests could hold the ballast and stay resident.
    size = 400 * 2**20
    ballast = mmap.mmap(-1, size)
    for offset in range(0, size, mmap.PAGESIZE):  # touch every page
        ballast[offset] = 1
    high = peak_memory_mib()
    ballast.close()  # unmapped: the resident set drops by 400 MiB
    reset_peak_memory()
    assert high > 400 and peak_memory_mib() < high - 300


def test_record_counts_completed_epochs_and_keeps_last_validation(tmp_path):
    record = run(tiny_cfg("listops", "softmax", "trainer.max_epochs=2"), tmp_path)
    assert record.epochs == 2 and record.steps == 8
    assert set(record.metrics.val_last) >= {"val/acc", "val/loss"}


@pytest.mark.parametrize("cap", ["trainer.max_steps=4", "trainer.max_epochs=1"])
def test_favor_redraw_interval_equal_to_the_cap_never_redraws_and_the_record_says_so(tmp_path, cap):
    """redraw_interval 4 in a 4-step run (max_steps, or one epoch of 4 steps): the redraw that would fall on the
    last step is skipped, so the last validation and the test score the features the model trained with;
    interval 2 redraws once (after step 2), and a fixed-features run records 0."""
    record = run(tiny_cfg("listops", "favor_plus", cap, "attention.kwargs.redraw_interval=4"), tmp_path / "a")
    assert (record.steps, record.feature_redraws) == (4, 0)
    once = run(tiny_cfg("listops", "favor_plus", cap, "attention.kwargs.redraw_interval=2"), tmp_path / "b")
    assert once.feature_redraws == 1
    fixed = run(tiny_cfg("listops", "favor_plus", cap, "attention.kwargs.redraw_interval=0", "test=false"),
                tmp_path / "c")
    assert fixed.feature_redraws == 0
