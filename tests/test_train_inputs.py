"""The training app's bad input: unknown or misspelled keys and values, trainer arguments the app sets, translation
data that is missing, corrupt, unequal or too long; each stops at start with one clear message."""

import os
import re
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest

from efficient_attn_tasks.config.checks import ConfigError, check_config
from efficient_attn_tasks.run.fit import run
from efficient_attn_tasks.tasks import translation, translation_data
from efficient_attn_tasks.tasks.data import DataError
from tests.helpers import QUIET, SHARED_DATA, config, tiny_cfg

pytestmark = pytest.mark.usefixtures("one_thread")

needs_data = pytest.mark.skipif(not SHARED_DATA.exists(), reason="needs ../shared/data")


def test_unknown_schedule_is_a_start_error():
    """An unknown optim.schedule (or a negative warm-up) is refused by the checks, before any data is built."""
    with pytest.raises(ConfigError, match=re.escape("optim.schedule must be one of ['inverse_sqrt', 'cosine', "
                                                    "'constant'], got 'linear'")):
        check_config(tiny_cfg("listops", "softmax", "optim.schedule=linear"))
    with pytest.raises(ConfigError, match="optim.warmup_steps must be an int >= 0"):
        check_config(tiny_cfg("listops", "softmax", "optim.warmup_steps=-5"))


@pytest.mark.parametrize("override, message", [
    ("++trainer.callbacks=[]", "trainer.callbacks is set by the app; remove it: .*run\\(cfg, out_dir, callbacks="),
    ("++trainer.logger=false", "trainer.logger is set by the app; remove it: .*logger=none"),
    ("++trainer.default_root_dir=/tmp/x", "trainer.default_root_dir is set by the app; remove it: .*hydra.run.dir"),
    ("++trainer.enable_checkpointing=false", "trainer.enable_checkpointing=False: the app always checkpoints"),
    ("++trainer.barebones=true", "trainer.barebones=True: barebones disables the checkpoints"),
])
def test_trainer_arguments_the_app_sets_are_start_errors(override, message):
    """Trainer arguments the app sets itself are refused at start, naming the setting to use instead (not
    pl.Trainer's "got multiple values" or a Lightning MisconfigurationException after the data is built)."""
    with pytest.raises(ConfigError, match=message):
        check_config(tiny_cfg("listops", "softmax", override))
    check_config(tiny_cfg("listops", "softmax", "++trainer.enable_checkpointing=true"))  # the default value is fine


@pytest.mark.parametrize("override, message", [
    ("task.source=wmt", r"task.source must be one of \['multi30k', 'files', 'hf', 'synthetic'\], got 'wmt'"),
    ("task.source=files", r"task.source=files needs task.files="),
    ("task.source=hf", r"task.source=hf needs task.hf_name"),
    ("task.tokenizer=wordpiece", r"task.tokenizer must be one of \['bpe', 'unigram', 'char'\]"),
    ("task.beam_size=0", r"task.beam_size must be an int >= 1"),
    ("task.max_tokens=0", r"task.max_tokens must be a positive int, got 0"),
    ("task.label_smoothing=1.5", r"task.label_smoothing must be in \[0, 1\)"),
    ("task.max_len_a=-1", r"task.max_len_a and task.max_len_b must be >= 0"),
    ("task.synthetic_sizes=[10,10]", r"task.synthetic_sizes must be three positive ints"),
])
def test_translation_task_values_are_checked_at_start(override, message):
    """The translation section is validated by its schema (translation.Config) like the other tasks': these
    fail check_config, before any data is loaded."""
    with pytest.raises(ConfigError, match=rf"^task.translation: {message}"):
        check_config(tiny_cfg("translation", "softmax", override))
    with pytest.raises(ValueError, match=message):  # the task's own build checks the same schema
        translation.task_config(tiny_cfg("translation", "softmax", override))


def write_split_files(root: Path, lines: dict[str, list[str]]) -> str:
    """One copy-task file per split (source = target); the task.files override."""
    for split, split_lines in lines.items():
        (root / f"{split}.txt").write_text("\n".join(split_lines) + "\n")
    files = ",".join(f"{split}:['{root / f'{split}.txt'}','{root / f'{split}.txt'}']" for split in lines)
    return f"task.files={{{files}}}"


def char_translation(files: str, max_len: int, *extra: str):
    """A copy task on ``files``, character tokens (a word of n letters is n + 1 tokens, with ▁)."""
    return config("task=translation", "task.source=files", files, "task.tokenizer=char", "task.vocab_size=40",
                  "task.batch_size=4", "model=tiny", f"model.max_len={max_len}", "logger=none",
                  "++trainer.fast_dev_run=true", *QUIET, *extra)


SHORT = ["ab", "cd", "ef", "abc", "bcd", "def", "fed", "cba"]


@pytest.mark.parametrize("split, fix", [
    ("test", "raise model.max_len to >= 22"),
    ("train", "lower task.max_tokens to <= 11 .* or raise model.max_len to >= 22"),
])
def test_translation_pairs_longer_than_max_len_stop_before_training(tmp_path, split, fix):
    """A sentence of any split longer than model.max_len stops the run once the data is tokenised, before
    training, naming the split, the lengths and the fix."""
    lines = {s: list(SHORT) for s in ("train", "val", "test")}
    lines[split].append("abcdefabcdefabcdefab")  # 20 letters: 21 tokens (with ▁), BOS + 21 = 22 positions
    cfg = char_translation(write_split_files(tmp_path, lines), 12)
    check_config(cfg)  # 12 < BOS + max_tokens, but the data decides: not refused at start
    with pytest.raises(ConfigError, match=rf"translation: 1 of 9 {split} pairs exceed model.max_len=12 positions "
                                          rf"\(longest source 21 tokens, longest BOS \+ target 22; "
                                          rf"task.max_tokens=128\); {fix}"):
        run(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing trained


def test_decoding_limit_is_capped_at_max_len_with_a_note(tmp_path, capsys):
    """a·|src| + b beyond model.max_len is capped there (the decoder has no further positions), with a note:
    every reference fits (at most max_len - 1 tokens + EOS), so the cap cuts no hypothesis that could match."""
    assert translation_data.decoding_limit(9, 16, 1.5, 10) == 16
    assert translation_data.decoding_limit(2, 16, 1.5, 10) == 13
    assert translation_data.decoding_cap_note("test", [3, 4], 16, 1.5, 10) is None
    lines = {s: list(SHORT) for s in ("train", "val", "test")}
    lines["test"].append("abcdefab")  # 9 tokens: fits, but 1.5 · 9 + 10 = 23 > 16
    record = run(char_translation(write_split_files(tmp_path, lines), 16), tmp_path / "run")
    assert record.metrics.test
    assert ("translation: 1 of 9 test sources have task.max_len_a·|src| + task.max_len_b > model.max_len=16 "
            "(up to 23); their hypotheses are capped at 16 tokens") in capsys.readouterr().out


def test_misspelled_keys_are_errors_that_name_the_key():
    cfg = config("task=listops", "++task.min_lenght=10")
    with pytest.raises(ConfigError, match=r"task.min_lenght; did you mean task.min_length"):
        check_config(cfg)
    with pytest.raises(ConfigError, match=r"attention 'favor' has no option\(s\) \['num_feature'\]"):
        check_config(config("attention=favor_plus", "++attention.kwargs.num_feature=8"))
    with pytest.raises(ConfigError, match="trainer.max_epoch; did you mean trainer.max_epochs"):
        check_config(config("++trainer.max_epoch=3"))
    with pytest.raises(ConfigError, match="not divisible by model.num_heads"):
        check_config(config("model.d_model=30"))
    with pytest.raises(ConfigError, match="unknown task 'mt'"):
        check_config(config("task.name=mt"))


def test_unknown_attention_and_misspelled_override_stop_the_cli():
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    cmd = [sys.executable, "-m", "efficient_attn_tasks.commands.train"]
    out = subprocess.run([*cmd, "attention=favr"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2 and out.stderr.startswith("error: attention=favr: no such config; did you mean")
    assert "favor_plus" in out.stderr  # the close options are named
    out = subprocess.run([*cmd, "model.d_modle=64"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2 and "d_modle" in out.stderr and "did you mean model.d_model=64" in out.stderr


def test_missing_data_dir_without_network_is_a_clear_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("network unreachable")

    monkeypatch.setattr("urllib.request.urlopen", offline)
    task = translation.task_config(config("task=translation"))
    with pytest.raises(DataError,
                       match=r"6 of 6 data files are not in the data dir .*multi30k/train.en.gz.* point data_dir="):
        translation_data.load_pairs(task, tmp_path / "nowhere")


def files_override(src: Path, tgt: Path) -> str:
    pair = f"['{src}','{tgt}']"
    return f"task.files={{train:{pair},val:{pair},test:{pair}}}"


def test_hf_datasets_corpora_are_read_by_split_and_language(monkeypatch):
    rows = {"train": [{"en": "a cat", "de": "eine Katze"}], "validation": [{"en": "a", "de": "ein"}],
            "test": [{"en": "dog", "de": "Hund"}]}
    calls = []

    def load_dataset(name, config):
        calls.append((name, config))
        return {split: {"translation": items} for split, items in rows.items()}

    monkeypatch.setitem(sys.modules, "datasets", type(sys)("datasets"))
    monkeypatch.setattr(sys.modules["datasets"], "load_dataset", load_dataset, raising=False)
    pairs = translation_data.load_pairs(translation.task_config(config("task=translation", "task.source=hf",
                                                                  "task.hf_name=wmt14", "task.hf_config=de-en")))
    assert calls == [("wmt14", "de-en")]
    assert pairs["train"] == (["a cat"], ["eine Katze"]) and pairs["val"] == (["a"], ["ein"])


def test_parallel_files_of_unequal_length_are_rejected(tmp_path):
    for name, n in (("a.src", 3), ("a.tgt", 2)):
        (tmp_path / name).write_text("x y\n" * n)
    cfg = config("task=translation", "task.source=files", files_override(tmp_path / "a.src", tmp_path / "a.tgt"))
    with pytest.raises(DataError, match="source has 3 lines but target has 2"):
        translation_data.load_pairs(translation.task_config(cfg))


def test_corrupt_or_altered_files_are_clear_errors(tmp_path):
    (tmp_path / "multi30k").mkdir()
    for split in ("train", "val", "test_2016_flickr"):
        for lang in ("en", "de"):
            (tmp_path / "multi30k" / f"{split}.{lang}.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(DataError, match="does not match its SHA-256 .* delete it to download it again"):
        translation_data.load_pairs(translation.task_config(config("task=translation")), tmp_path)
    gz = tmp_path / "multi30k" / "train.en.gz"
    with pytest.raises(DataError, match="cannot read .*train.en.gz.*corrupt or truncated"):
        translation_data.load_pairs(translation.task_config(config("task=translation", "task.source=files",
                                                              files_override(gz, gz))))
