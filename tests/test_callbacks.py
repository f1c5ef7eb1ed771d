"""Optional Lightning callbacks from the ``callbacks`` config group (early stopping on the task's metric, EMA
tested as validated, strict keys), and the attention config name (favor_relu, not only favor) in results.json,
run dirs and W&B tags."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import EarlyStopping, EMAWeightAveraging

from efficient_attn_tasks.config.checks import CONFIG_DIR, ConfigError, check_config
from efficient_attn_tasks.run import loggers
from efficient_attn_tasks.run.fit import run
from efficient_attn_tasks.run.record import RunRecord
from tests.helpers import config, config_files, tiny_cfg

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
NEVER_BETTER = "callbacks.early_stopping.min_delta=10"  # no accuracy improves by 10: every validation after the first


class Seen(pl.Callback):
    """The trainer's callbacks, and the weights the test split is evaluated with."""

    def on_fit_start(self, trainer, module) -> None:
        self.callbacks = list(trainer.callbacks)

    def on_test_start(self, trainer, module) -> None:
        self.tested = {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_early_stopping_from_config_stops_on_the_tasks_metric(tmp_path):
    """callbacks=early_stopping, patience 1: listops validates every 4 steps; the second validation does not
    improve (min_delta 10), so the run stops at step 8 of 5 epochs (20 steps), watching val/acc upwards."""
    seen = Seen()
    record = run(tiny_cfg("listops", "softmax", "trainer.max_epochs=5", "callbacks=early_stopping",
                      "callbacks.early_stopping.patience=1", NEVER_BETTER, "test=false"), tmp_path, callbacks=[seen])
    stopper = [c for c in seen.callbacks if isinstance(c, EarlyStopping)]
    assert len(stopper) == 1 and (stopper[0].monitor, stopper[0].mode, stopper[0].patience) == ("val/acc", "max", 1)
    assert record.steps == 8 and record.epochs == 2


def best_checkpoint_step(record: RunRecord) -> int:
    """The step in the best checkpoint's file name (``best-step=N.ckpt``)."""
    return int(Path(record.metrics.best_checkpoint).stem.removeprefix("best-step="))


def test_early_stopping_that_fires_records_converged_best_and_stopped_step(tmp_path):
    """Patience 1, never better: stops at step 8 of a 20-step cap; converged, best step from its checkpoint."""
    record = run(tiny_cfg("listops", "softmax", "trainer.max_epochs=5", "callbacks=early_stopping",
                          "callbacks.early_stopping.patience=1", NEVER_BETTER, "test=false"), tmp_path)
    assert record.stopped_step == record.steps == 8 and record.converged is True
    assert record.best_step in (4, 8) and record.best_step == best_checkpoint_step(record)
    assert record.feature_redraws is None  # softmax has no random features
    assert RunRecord.read(tmp_path / "results.json") == record


def test_early_stopping_that_never_fires_records_a_run_still_improving(tmp_path):
    """Patience 10 over 2 validations: the cap (8 steps) ends the run, still improving: False."""
    record = run(tiny_cfg("listops", "softmax", "trainer.max_epochs=2", "callbacks=early_stopping",
                          "callbacks.early_stopping.patience=10", "test=false"), tmp_path)
    assert (record.stopped_step, record.converged) == (8, False)
    assert record.best_step == best_checkpoint_step(record)


def test_without_early_stopping_converged_is_false_only_for_a_best_last_validation(tmp_path):
    record = run(tiny_cfg("listops", "softmax", "trainer.max_epochs=2", "test=false"), tmp_path)
    assert record.stopped_step == 8 and record.best_step == best_checkpoint_step(record)
    assert record.converged is (False if record.best_step == 8 else None)
    unvalidated = run(tiny_cfg("listops", "softmax", "trainer.max_steps=2", "trainer.limit_val_batches=0",
                               "test=false"), tmp_path / "no_val")
    assert (unvalidated.stopped_step, unvalidated.best_step, unvalidated.converged) == (2, None, None)


def test_default_callbacks_add_nothing(tmp_path):
    assert OmegaConf.to_container(config().callbacks) == {}
    assert OmegaConf.to_container(config("callbacks=none").callbacks) == {}


def test_several_callbacks_compose_and_a_monitor_can_be_given_with_its_mode():
    cfg = config("callbacks=[early_stopping,ema,model_summary]", "callbacks.early_stopping.monitor=val/loss",
                 "callbacks.early_stopping.mode=min", "callbacks.ema.decay=0.9")
    check_config(cfg)
    assert list(cfg.callbacks) == ["early_stopping", "ema", "model_summary"] and cfg.callbacks.ema.decay == 0.9


@pytest.mark.parametrize("overrides, message", [
    (["callbacks=early_stopping", "+callbacks.early_stopping.patiense=1"],
     "unknown config key callbacks.early_stopping.patiense; did you mean callbacks.early_stopping.patience?"),
    (["+callbacks.erly_stopping.patience=1"],
     "callbacks.erly_stopping has no _target_; did you mean early_stopping? choose callbacks=<file>"),
    (["callbacks=early_stopping", "callbacks.early_stopping._target_=pytorch_lightning.callbacks.EarlyStoping"],
     "callbacks.early_stopping._target_: cannot import 'pytorch_lightning.callbacks.EarlyStoping'"),
    (["+callbacks.x._target_=torch.nn.Linear"], "callbacks.x._target_: torch.nn.Linear is not a Lightning callback"),
    (["callbacks=early_stopping", "callbacks.early_stopping.monitor=val/loss"],
     "callbacks.early_stopping: give monitor and mode together"),  # else Lightning's default min would be used
    (["+callbacks.stop._target_=pytorch_lightning.callbacks.EarlyStopping"],
     "callbacks.stop: missing argument monitor of EarlyStopping"),
    (["callbacks=lr_monitor", "logger=none"], "callbacks.lr_monitor: LearningRateMonitor logs to a logger"),
])
def test_a_wrong_callback_is_a_config_error_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        check_config(config(*overrides))
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_the_cli_refuses_an_unknown_callback_key_in_one_line(tmp_path):
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "efficient_attn_tasks.commands.train", "logger=none",
                          "callbacks=early_stopping",
                          "+callbacks.early_stopping.patiense=1"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["error: unknown config key callbacks.early_stopping.patiense; "
                                               "did you mean callbacks.early_stopping.patience?"]
    assert not (tmp_path / "outputs").exists() or not list((tmp_path / "outputs").rglob("results.json"))


def test_ema_weights_are_validated_checkpointed_and_tested(tmp_path):
    """callbacks=ema: the best checkpoint's state_dict holds the averaged weights, and the test scores them.
    (Lightning's callback, left alone, reloads the raw weights, current_model_state, when test loads the checkpoint.)"""
    seen = Seen()
    record = run(tiny_cfg("listops", "softmax", "trainer.max_steps=4", "callbacks=ema", "callbacks.ema.decay=0.5",
                      "optim.warmup_steps=1", "optim.lr=1e-2"), tmp_path, callbacks=[seen])
    assert any(isinstance(c, EMAWeightAveraging) for c in seen.callbacks)
    checkpoint = torch.load(record.metrics.best_checkpoint, map_location="cpu", weights_only=False)
    averaged, raw = checkpoint["state_dict"], checkpoint["current_model_state"]
    assert any(not torch.equal(averaged[k], raw[k]) for k in averaged)  # the average differs from the raw weights
    assert seen.tested.keys() == averaged.keys()
    assert all(torch.equal(seen.tested[k], averaged[k]) for k in averaged)


def test_results_json_names_the_attention_config(tmp_path):
    record = run(tiny_cfg("listops", "favor_relu", "++trainer.fast_dev_run=true"), tmp_path)
    saved = RunRecord.read(tmp_path / "results.json")
    assert (saved.attention, saved.attention_config) == ("favor", "favor_relu") == \
        (record.attention, record.attention_config)


def test_every_attention_config_names_itself_and_run_dirs_carry_it():
    for name in config_files("attention"):
        assert config(f"attention={name}").attention.config == name, f"configs/attention/{name}.yaml: config: {name}"
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        run_dir = compose("train", overrides=["attention=favor_relu"], return_hydra_config=True).hydra.run.dir
        without = compose("train", overrides=["attention=favor_relu", "~attention.config"],
                          return_hydra_config=True).hydra.run.dir
    assert run_dir.endswith("_listops_favor_relu") and without.endswith("_listops_favor")


def test_per_layer_runs_name_their_layers():
    from efficient_attn_tasks.config.labels import attention_config

    cfg = config("task=lm", "model=tiny", "model.decoder_layers=2", "model.layer_attentions=[favor_relu,softmax]")
    assert attention_config(cfg) == "favor_relu+softmax"


def test_wandb_run_is_tagged_and_typed_with_the_attention_config(tmp_path, monkeypatch):
    captured = {}

    class FakeWandbLogger:
        def __init__(self, **kwargs) -> None:
            captured.update(kwargs)
            self.experiment = object()

    monkeypatch.setattr("pytorch_lightning.loggers.WandbLogger", FakeWandbLogger)
    loggers._wandb_logger(config("attention=favor_relu"), tmp_path / "0_favor_relu", "disabled")
    assert captured["tags"] == ["favor", "favor_relu", "listops"] and captured["job_type"] == "favor_relu"
    assert captured["group"] == "listops" and captured["name"] == "0_favor_relu"


def stopped_at(values, **kw):
    """The index of the validation at which ArmedEarlyStopping (patience 2, min_delta 0.001, mode max) stops."""
    from efficient_attn_tasks.run.callbacks import ArmedEarlyStopping, early_stopping_outcome

    stop = ArmedEarlyStopping(monitor="val/acc", mode="max", patience=2, min_delta=0.001, **kw)
    for i, v in enumerate(values):
        if stop._evaluate_stopping_criteria(torch.tensor(v))[0]:
            stop.stopped_epoch = i
            assert early_stopping_outcome([stop]) == (True, True)  # a stop on its plateau: converged
            return i
    assert early_stopping_outcome([stop]) == (True, False)
    return None


def test_armed_early_stopping_never_stops_a_run_on_the_floor_only_one_that_learned():
    """MQAR at 8 pairs: a floor plateau (0.13 best, then 2 validations without a 0.001 gain) stops plain early
    stopping at validation 3; armed at 0.5, patience counts from the learned plateau (0.99 at 7): stop at 9."""
    late = [0.12, 0.13, 0.125, 0.128, 0.127, 0.126, 0.9, 0.99, 0.99, 0.99]
    assert stopped_at(late) == 3
    assert stopped_at(late, arm_at=0.5) == 9
    assert stopped_at([0.12, 0.125] * 10, arm_at=0.5) is None  # never learned: runs to the cap, still improving
    assert stopped_at([0.12, 0.13, 0.5, 0.5, 0.5], arm_at=0.5) == 4  # arm_at reached exactly arms it


def test_mqar_experiments_use_armed_early_stopping():
    cfg = config("experiment=mqar/cpu")
    assert cfg.callbacks.early_stopping._target_.endswith("ArmedEarlyStopping")
    assert cfg.callbacks.early_stopping.arm_at == 0.5 and cfg.callbacks.early_stopping.patience == 2


def test_mqar_armed_early_stopping_runs_on_the_tasks_metric_and_never_stops_below_arm_at(tmp_path):
    """callbacks=mqar_early_stopping in a real run: monitor and mode come from the task (val/acc, max); with
    patience 1 and no validation ever improving (min_delta 10) plain early stopping would stop at the second
    validation, but val/acc never reaches arm_at (0.5) in a few steps, so the run goes to its cap."""
    seen = Seen()
    cfg = tiny_cfg("mqar", "softmax", "trainer.max_epochs=3", "callbacks=mqar_early_stopping",
                   "callbacks.early_stopping.patience=1", NEVER_BETTER, "test=false")
    record = run(cfg, tmp_path, callbacks=[seen])
    stopper = [c for c in seen.callbacks if isinstance(c, EarlyStopping)]
    assert len(stopper) == 1 and (stopper[0].monitor, stopper[0].mode, stopper[0].arm_at) == ("val/acc", "max", 0.5)
    assert record.epochs == 3 and record.converged is False
