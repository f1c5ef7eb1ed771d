"""efficient-attn-train on the command line: --help and a bare run explain the app, start-up stays light (no torch
before the task's module is needed, no W&B before a run starts), start errors are one line and leave no run dir,
logs suit a non-terminal, data errors name every missing file."""

import inspect
import io
import json
import os
import re
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest

from efficient_attn_tasks.config.checks import trainer_arguments
from efficient_attn_tasks.run.callbacks import progress_bar
from efficient_attn_tasks.run.fit import run
from efficient_attn_tasks.run.record import RunRecord
from efficient_attn_tasks.run.resume import remove_unstarted_run_dir
from efficient_attn_tasks.tasks import data, translation, translation_data
from efficient_attn_tasks.tasks.data import DataError
from tests.helpers import REPO, TINY_TRANSLATION, config, fresh_python

pytestmark = pytest.mark.usefixtures("one_thread")

HEAVY = ("pytorch_lightning", "lightning", "wandb", "sacrebleu", "sentencepiece", "torchmetrics", "matplotlib")
TINY = ["task=translation", *TINY_TRANSLATION, "model=tiny", "trainer.max_epochs=1", "test=false",
        "++trainer.enable_model_summary=false"]
MULTI30K = [f"multi30k/{split}.{lang}.gz" for split in ("train", "val", "test_2016_flickr") for lang in ("en", "de")]


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "efficient_attn_tasks.commands.train", *args], capture_output=True,
                          text=True, env=env,
                          cwd=cwd, timeout=120)


def test_help_says_what_it_does_with_examples_groups_and_outputs(tmp_path):
    for flag in ("--help", "-h"):
        out = cli(flag, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        text = out.stdout
        assert text.startswith("efficient-attn-train: train one task")
        examples = text[text.index("Examples:"):text.index("Outputs:")]
        assert len(re.findall(r"^\s+efficient-attn-train ", examples, flags=re.M)) == 3
        assert "experiment=quickstart" in examples and "-m " in examples
        for where in ("outputs/<date>/", "multirun/<date>/", "results.json", "--cfg job", "ckpt_path=last"):
            assert where in text, where
        assert re.search(r"^attention: .*favor_plus", text, flags=re.M)  # the config groups and their options
        assert re.search(r"^experiment/mqar: .*quick", text, flags=re.M)
        assert "seed: 0" not in text  # not the whole default config
    assert not (tmp_path / "outputs").exists()


def test_bare_run_prints_the_help_and_trains_nothing(tmp_path):
    out = cli(cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "Examples:" in out.stdout and "efficient-attn-train experiment=quickstart" in out.stdout
    assert not (tmp_path / "outputs").exists()


def test_importing_the_app_loads_neither_torch_nor_lightning_nor_wandb():
    out = fresh_python(
        "import sys, efficient_attn_tasks.commands.train\n"
        f"loaded = [m for m in {(*HEAVY, 'torch')!r} if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    assert out.returncode == 0, out.stderr


def _check_fails(overrides: list[list[str]], then: str) -> subprocess.CompletedProcess:
    """check_config in a fresh interpreter refuses each of ``overrides``; then runs ``then`` (assertions)."""
    return fresh_python(
        "import sys\n"
        "from hydra import compose, initialize_config_dir\n"
        "from efficient_attn_tasks.config.checks import CONFIG_DIR, ConfigError, check_config\n"
        f"for overrides in {overrides!r}:\n"
        "    with initialize_config_dir(config_dir=CONFIG_DIR, version_base='1.3'):\n"
        "        cfg = compose('train', overrides=overrides)\n"
        "    try:\n"
        "        check_config(cfg)\n"
        "    except ConfigError:\n"
        "        pass\n"
        "    else:\n"
        "        raise AssertionError(f'{overrides} passed')\n"
        + then
    )


def test_errors_outside_the_task_and_model_are_reported_before_torch_loads():
    """Top-level, optim, trainer and logger keys and values are checked before the task's module loads."""
    out = _check_fails([["++sed=1"], ["++optim.learning_rate=1"], ["optim.schedule=linear"], ["++trainer.max_epoch=3"],
                        ["++trainer.callbacks=[]"], ["++trainer.logger=false"], ["logger.kind=tensorboard"]],
                       f"loaded = [m for m in {(*HEAVY, 'torch')!r} if m in sys.modules]\nassert not loaded, loaded\n")
    assert out.returncode == 0, out.stderr


def test_task_model_and_attention_errors_load_the_tasks_module_only():
    """The task's section is checked by its module's Config: torch and Lightning load then (and the task's own
    imports, e.g. translation's sacreBLEU; Lightning imports matplotlib), never W&B or another task's code."""
    out = _check_fails([["task=translation", "++task.min_lenght=3"], ["task=translation", "task.beam_size=0"]],
                       "assert 'pytorch_lightning' in sys.modules\n"
                       "assert 'wandb' not in sys.modules\n")
    assert out.returncode == 0, out.stderr
    out = _check_fails([["task=listops", "++task.min_lenght=3"], ["model.d_model=30"], ["attention=retention"],
                        ["model.max_len=1024"]],
                       "loaded = [m for m in ('wandb', 'sacrebleu', 'sentencepiece') if m in sys.modules]\n"
                       "assert not loaded, loaded\n"
                       "assert 'efficient_attn_tasks.tasks.translation' not in sys.modules\n")
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("override, message", [
    ("optim.schedule=linear", "error: optim.schedule must be one of ['inverse_sqrt', 'cosine', 'constant'], "
                              "got 'linear'"),
    ("++trainer.callbacks=[]", "error: trainer.callbacks is set by the app; remove it: "),
])
def test_start_errors_are_one_line_and_exit_2(tmp_path, override, message):
    """Settings that only the scheduler or the trainer would refuse stop the command at start, one line,
    before any data is built."""
    run_dir = tmp_path / "run"
    out = cli(*TINY, override, "logger=none", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert out.returncode == 2 and out.stderr.startswith(message), out.stderr[-2000:]
    assert len(out.stderr.strip().splitlines()) == 1 and not run_dir.exists()


def test_trainer_keys_read_from_source_match_the_signature():
    import pytorch_lightning as pl

    assert trainer_arguments() == set(inspect.signature(pl.Trainer).parameters)


def test_config_error_on_the_cli_leaves_no_run_dir(tmp_path):
    run_dir = tmp_path / "run"
    out = cli("++task.min_lenght=3", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert out.returncode == 2 and "did you mean task.min_length?" in out.stderr
    assert not run_dir.exists()


def test_only_untouched_run_dirs_are_removed(tmp_path):
    (tmp_path / "a" / ".hydra").mkdir(parents=True)
    (tmp_path / "a" / "train.log").write_text("")
    assert remove_unstarted_run_dir(tmp_path / "a") and not (tmp_path / "a").exists()
    (tmp_path / "b" / ".hydra").mkdir(parents=True)
    (tmp_path / "b" / "checkpoints").mkdir()
    assert not remove_unstarted_run_dir(tmp_path / "b") and (tmp_path / "b" / "checkpoints").exists()


def test_a_run_dir_with_only_its_failed_record_is_unstarted_a_finished_one_is_not(tmp_path):
    for name, status in (("failed", "failed"), ("ok", "ok"), ("old", None)):  # old: a record from before "status"
        (tmp_path / name / ".hydra").mkdir(parents=True)
        (tmp_path / name / "results.json").write_text(json.dumps({"status": status} if status else {"steps": 3}))
    assert remove_unstarted_run_dir(tmp_path / "failed") and not (tmp_path / "failed").exists()
    assert not remove_unstarted_run_dir(tmp_path / "ok") and not remove_unstarted_run_dir(tmp_path / "old")


def test_a_single_run_stopped_by_a_nonfinite_loss_exits_2_and_leaves_its_failed_record(tmp_path):
    run_dir = tmp_path / "run"
    out = cli(*TINY, "logger=none", "threads=1", "optim.lr=1e30", "optim.warmup_steps=1",
              "trainer.enable_progress_bar=false", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert out.returncode == 2 and re.search(r"^error: non-finite loss or gradient at step \d+", out.stderr, re.M), \
        out.stderr[-2000:]
    record = RunRecord.read(run_dir / "results.json")
    assert record.status == "failed" and record.error.type == "FloatingPointError" and record.steps > 0
    assert "optim.lr=1e30" in record.overrides and (run_dir / ".hydra").is_dir()


def test_progress_bars_only_on_a_terminal_unless_set():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert progress_bar(None, Terminal()) is True
    assert progress_bar(None, io.StringIO()) is False
    assert progress_bar(True, io.StringIO()) is True and progress_bar(False, Terminal()) is False
    assert config().trainer.enable_progress_bar is None  # the default is the automatic rule


def test_non_terminal_run_prints_one_line_per_epoch_and_no_lightning_info(tmp_path, capfd):
    run(config(*TINY, "logger=none", "trainer.max_epochs=2"), tmp_path)
    out = capfd.readouterr()
    text = out.out + out.err
    lines = re.findall(r"^epoch (\d)/2 step \d+ train/loss [\d.]+ val/bleu [\d.]+ \d+s$", text, flags=re.M)
    assert lines == ["1", "2"], text[-3000:]
    assert "it/s" not in text and "Epoch 0:" not in text  # no progress bar
    for info in ("GPU available", "TPU available", "Tip:"):
        assert info not in text


def test_offline_wandb_run_ends_with_the_sync_command(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run(config(*TINY, "logger=wandb", "++trainer.fast_dev_run=true"), tmp_path)
    text = capfd.readouterr().out
    found = re.findall(r"^W&B offline: sync with: wandb sync (\S+)$", text, flags=re.M)
    assert len(found) == 1 and Path(found[0]).is_dir() and Path(found[0]).parent == tmp_path / "wandb"


def test_disabled_wandb_prints_no_sync_note(tmp_path, capfd):
    assert os.environ["WANDB_MODE"] == "disabled"
    record = run(config(*TINY, "logger=wandb", "++trainer.fast_dev_run=true"), tmp_path)
    assert "W&B offline" not in capfd.readouterr().out
    assert record.threads == 1  # the one_thread fixture's count, recorded (threads=null, no joblib)


def test_missing_multi30k_lists_every_missing_file_and_tries_one_download(tmp_path, monkeypatch):
    calls = []

    def offline(url, *args, **kwargs):
        calls.append(url)
        raise urllib.error.URLError("network unreachable")

    monkeypatch.setattr("urllib.request.urlopen", offline)
    root = tmp_path / "data"
    (root / "multi30k").mkdir(parents=True)
    (root / "multi30k" / "val.de.gz").write_bytes(b"present")  # not missing: not listed
    with pytest.raises(DataError) as err:
        translation_data.load_pairs(translation.task_config(config("task=translation")), root)
    message = str(err.value)
    assert "5 of 6 data files are not in the data dir" in message and "network unreachable" in message
    assert message.count("point data_dir=") == 1  # the advice once
    for name in MULTI30K:
        assert (name in message) == (name != "multi30k/val.de.gz"), name
    assert len(calls) == 1  # the first failed download stops the others
    assert not list((root / "multi30k").glob("tmp*"))  # no partial downloads left


def test_data_dir_is_under_the_cache_dir_as_the_docs_say(tmp_path, monkeypatch):
    monkeypatch.delenv("EFFICIENT_ATTN_DATA", raising=False)
    monkeypatch.setenv("EFFICIENT_ATTN_CACHE", str(tmp_path / "cache"))
    assert data.data_dir() == tmp_path / "cache" / "data"
    assert data.data_dir(None, tmp_path / "mine") == tmp_path / "mine" / "data"  # config cache_dir=
    monkeypatch.delenv("EFFICIENT_ATTN_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.data_dir() == tmp_path / "xdg" / "efficient_attn" / "data"
    monkeypatch.setenv("EFFICIENT_ATTN_DATA", str(tmp_path / "d"))
    assert data.data_dir(None, tmp_path / "mine") == tmp_path / "d"
    assert data.data_dir(tmp_path / "x") == tmp_path / "x"
    docs = (REPO / "docs" / "training.md").read_text()
    assert "else `$EFFICIENT_ATTN_DATA`, else `<cache dir>/data`" in docs
