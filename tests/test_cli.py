"""The command line: --help and a bare run explain the app, start-up stays light (no Lightning, W&B or
sacreBLEU before a run starts), logs suit a non-terminal, data errors name every missing file."""

import inspect
import io
import os
import re
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from tasks import data, translation
from tasks.callbacks import progress_bar
from tasks.data import DataError
from tasks.train import CONFIG_DIR, remove_unstarted_run_dir, run, trainer_arguments

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("pytorch_lightning", "lightning", "wandb", "sacrebleu", "sentencepiece", "torchmetrics", "matplotlib")
TINY = ["task=translation", "task.source=synthetic", "task.synthetic_sizes=[64,16,16]", "task.vocab_size=40",
        "task.batch_size=16", "model=tiny", "trainer.max_epochs=1", "test=false", "++trainer.enable_model_summary=false"]
MULTI30K = [f"multi30k/{split}.{lang}.gz" for split in ("train", "val", "test_2016_flickr") for lang in ("en", "de")]


def config(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=list(overrides))


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "tasks.train", *args], capture_output=True, text=True, env=env,
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


def _fresh_python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)


def test_importing_the_app_loads_neither_torch_nor_lightning_nor_wandb():
    out = _fresh_python(
        "import sys, tasks.train\n"
        f"loaded = [m for m in {(*HEAVY, 'torch')!r} if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    assert out.returncode == 0, out.stderr


def test_config_errors_come_before_lightning_wandb_and_sacrebleu_load():
    out = _fresh_python(
        "import sys\n"
        "from hydra import compose, initialize_config_dir\n"
        "from tasks.train import CONFIG_DIR, ConfigError, check_config\n"
        "for overrides in (['task=translation', '++task.min_lenght=3'], ['model.d_model=30'],\n"
        "                  ['++trainer.max_epoch=3'], ['attention=retention']):\n"
        "    with initialize_config_dir(config_dir=CONFIG_DIR, version_base='1.3'):\n"
        "        cfg = compose('train', overrides=overrides)\n"
        "    try:\n"
        "        check_config(cfg)\n"
        "    except ConfigError:\n"
        "        pass\n"
        "    else:\n"
        "        raise AssertionError(f'{overrides} passed')\n"
        f"loaded = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    assert out.returncode == 0, out.stderr


def test_key_typos_outside_the_model_are_reported_before_torch_loads():
    out = _fresh_python(
        "import sys\n"
        "from hydra import compose, initialize_config_dir\n"
        "from tasks.train import CONFIG_DIR, ConfigError, check_config\n"
        "for overrides in (['++task.min_lenght=3'], ['++optim.learning_rate=1'], ['++trainer.max_epoch=3'],\n"
        "                  ['logger.kind=tensorboard'], ['++sed=1']):\n"
        "    with initialize_config_dir(config_dir=CONFIG_DIR, version_base='1.3'):\n"
        "        cfg = compose('train', overrides=overrides)\n"
        "    try:\n"
        "        check_config(cfg)\n"
        "    except ConfigError:\n"
        "        pass\n"
        "    else:\n"
        "        raise AssertionError(f'{overrides} passed')\n"
        "assert 'torch' not in sys.modules\n"
    )
    assert out.returncode == 0, out.stderr


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
    run(config(*TINY, "logger=wandb", "++trainer.fast_dev_run=true"), tmp_path)
    assert "W&B offline" not in capfd.readouterr().out


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
        translation.load_pairs(config("task=translation", f"data_dir={root}"))
    message = str(err.value)
    assert "5 of 6 data files are not in the data dir" in message and "network unreachable" in message
    for name in MULTI30K:
        assert (name in message) == (name != "multi30k/val.de.gz"), name
    assert len(calls) == 1  # the first failed download stops the others
    assert not list((root / "multi30k").glob("tmp*"))  # no partial downloads left


def test_data_dir_is_under_the_cache_dir_as_the_readme_says(tmp_path, monkeypatch):
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
    readme = (REPO / "README.md").read_text()
    assert "else `$EFFICIENT_ATTN_DATA`, else `<cache dir>/data`" in readme
