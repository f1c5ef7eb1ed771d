"""Checkpoints run alone (inference/checkpoint.py): ``efficient-attn-eval`` on a checkpoint copied away from its
run, with an empty data dir and tokenizer cache, reproduces the run's test metrics for every task;
``--files`` scores like the split; ``efficient-attn-translate`` writes the run's test hypotheses;
``efficient-attn-generate`` continues a prompt as the full forward does; misuse is one clear error."""

import io
import json
import random
import shutil
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from efficient_attn_tasks.commands import evaluate, generate, translate
from efficient_attn_tasks.inference import checkpoint
from efficient_attn_tasks.inference import evaluate as scoring
from efficient_attn_tasks.run.fit import run
from efficient_attn_tasks.run.record import RunRecord
from efficient_attn_tasks.tasks import listops, lm, translation, translation_data
from tests.helpers import config, tiny_overrides

pytestmark = pytest.mark.usefixtures("one_thread")

# lm: FAVOR+ on a text file, the whole test split in evaluation (a short last batch)
LM = ["attention=favor_plus", "task.dataset=file", "task.eval_batches=null"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """task -> (run dir, results.json record) of a tiny run, trained once per module on one thread."""
    root, done = tmp_path_factory.mktemp("runs"), {}
    text = root / "text.txt"
    rng = random.Random(0)
    text.write_text("".join(" ".join(rng.choice(["the", "cat", "sat", "on", "a", "mat"]) for _ in range(8)) + ".\n"
                    for _ in range(250)))

    def get(task: str):
        if task not in done:
            extra = [*LM, f"task.path={text}"] if task == "lm" else []
            cfg = config(*tiny_overrides(task, "trainer.max_steps=6", *extra))
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                done[task] = (root / task, run(cfg, root / task))
            finally:
                torch.set_num_threads(threads)
        return done[task]

    return get


def best(record: RunRecord) -> Path:
    return Path(record.metrics.best_checkpoint)


def run_test_metrics(record: RunRecord) -> dict[str, float]:
    return {key.split("/", 1)[1]: value for key, value in record.metrics.test.items()}


def score(*argv: str) -> dict:
    return scoring.run(evaluate.parser().parse_args([str(a) for a in argv]))


def error(main, *argv, capsys) -> str:
    """The one-line error of a command that must refuse ``argv`` (exit status 2)."""
    with pytest.raises(SystemExit) as exit:
        main([str(a) for a in argv])
    assert exit.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


@pytest.mark.parametrize("task", ["translation", "listops", "lm", "mqar"])
def test_a_checkpoint_copied_alone_reproduces_its_runs_test_metrics(task, runs, tmp_path, monkeypatch, capsys):
    run_dir, record = runs(task)
    alone = tmp_path / "alone" / best(record).name
    alone.parent.mkdir()
    shutil.copy(best(record), alone)
    cache, data = tmp_path / "empty_cache", tmp_path / "empty_data"
    monkeypatch.setenv("EFFICIENT_ATTN_CACHE", str(cache))
    monkeypatch.setenv("EFFICIENT_ATTN_DATA", str(data))
    evaluate.main([str(alone)])
    saved = json.loads(alone.with_name(f"{alone.stem}.eval_test.json").read_text())
    assert saved["metrics"] == run_test_metrics(record)  # the same numbers, not close ones
    assert saved["checkpoint"] == str(alone.resolve()) and saved["checkpoint_choice"] == "the file given"
    assert saved["data"] == {"split": "test"} and saved["task"] == task and not data.exists()
    if task == "translation":
        assert not cache.exists()  # no tokenizer read from the cache or trained again: it is in the checkpoint
        assert Path(saved["hypotheses"]).read_text() == (run_dir / "test_hypotheses.txt").read_text()
        assert saved["bleu_signature"] == record.bleu_signature
        assert saved["beam"] == record.config["task"]["beam_size"]
    assert f"wrote {alone.with_name(alone.stem + '.eval_test.json')}" in capsys.readouterr().out


def test_a_run_dir_means_its_best_checkpoint_even_when_moved(runs, tmp_path):
    run_dir, record = runs("listops")
    moved = tmp_path / "moved"
    shutil.copytree(run_dir, moved)
    got = score(moved, "--split", "val", "--out", tmp_path / "val.json")
    assert got["checkpoint"] == str((moved / "checkpoints" / best(record).name).resolve())
    assert "results.json" in got["checkpoint_choice"] and got["data"] == {"split": "val"}
    assert got["metrics"]["acc"] == pytest.approx(record.metrics.val_best, rel=1e-6)  # the score that chose it
    (moved / "results.json").unlink()  # an unfinished run: its only best-*.ckpt
    assert score(moved, "--out", tmp_path / "t.json")["checkpoint_choice"] == f"the only best-*.ckpt of run {moved}"


def test_translate_writes_the_runs_test_hypotheses_and_files_score_like_the_split(runs, tmp_path, monkeypatch,
                                                                                  capsys):
    run_dir, record = runs("translation")
    src, ref = translation_data.load_pairs(translation.task_config(OmegaConf.create(record.config)))["test"]
    (tmp_path / "test.src").write_text("\n".join(src) + "\n")
    (tmp_path / "test.ref").write_text("\n".join(ref) + "\n")
    translate.main([str(best(record)), "--input", str(tmp_path / "test.src")])
    assert capsys.readouterr().out == (run_dir / "test_hypotheses.txt").read_text()
    got = score(run_dir, "--files", tmp_path / "test.src", tmp_path / "test.ref", "--out", tmp_path / "files.json")
    assert got["metrics"] == run_test_metrics(record)
    assert got["data"] == {"files": [str(tmp_path / "test.src"), str(tmp_path / "test.ref")]}
    capsys.readouterr()
    monkeypatch.setattr(sys, "stdin", io.StringIO("a b c\n\nd e f g\n"))
    translate.main([str(run_dir), "--beam", "1", "--batch-size", "2"])
    lines = capsys.readouterr().out.split("\n")
    assert len(lines) == 4 and lines[1] == "" and lines[3] == ""  # one line per input line, blank stays blank


def test_lm_scores_any_utf8_file_as_it_scores_its_split(runs, tmp_path):
    _, record = runs("lm")
    cfg = lm.task_config(OmegaConf.create(record.config))
    split = lm.split_bytes(cfg, lm.read_bytes(cfg, Path(cfg.path)))["test"]
    (tmp_path / "test.txt").write_bytes(bytes(split.tolist()))
    got = score(best(record), "--files", tmp_path / "test.txt", "--out", tmp_path / "r.json")
    assert got["metrics"] == run_test_metrics(record) and got["examples"] == (len(split) - 1) // cfg.context_length


def test_generate_continues_the_prompt_as_the_full_forward_does(runs, capsys):
    run_dir, _ = runs("lm")
    generate.main([str(run_dir), "--prompt", "the ", "--max-new-tokens", "8", "--temperature", "0"])
    model = checkpoint.load(run_dir).module.model
    tokens = torch.tensor([list(b"the ")])
    with torch.no_grad():
        for _ in range(8):  # the reference: argmax of a full forward over everything so far, no decoding state
            tokens = torch.cat([tokens, model(tokens)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert capsys.readouterr().out == "the " + bytes(tokens[0, 4:].tolist()).decode("utf-8", errors="replace") + "\n"
    draws = []
    for _ in range(2):
        generate.main([str(run_dir), "--prompt", "a", "--max-new-tokens", "20", "--top-k", "5", "--seed", "3"])
        draws.append(capsys.readouterr().out)
    assert draws[0] == draws[1] and draws[0].startswith("a")


def test_a_checkpoint_without_its_tokenizer_is_rebuilt_from_the_data_with_a_note(runs, tmp_path, capsys):
    _, record = runs("translation")
    saved = torch.load(best(record), map_location="cpu", weights_only=True)
    del saved["tokenizer"]  # as saved before checkpoints held it
    torch.save(saved, tmp_path / "old.ckpt")
    assert score(tmp_path / "old.ckpt")["metrics"] == run_test_metrics(record)
    assert "holds no tokenizer" in capsys.readouterr().err


def test_misuse_is_one_clear_error(runs, tmp_path, monkeypatch, capsys):
    (tmp_path / "bad.ckpt").write_bytes(b"not a checkpoint")
    lm_ckpt, tr_ckpt, lo_run = best(runs("lm")[1]), best(runs("translation")[1]), runs("listops")[0]
    assert "neither a checkpoint file nor a run dir" in error(evaluate.main, tmp_path / "nope", capsys=capsys)
    assert "cannot load" in error(evaluate.main, tmp_path / "bad.ckpt", capsys=capsys)
    assert "has no checkpoints/best-*.ckpt" in error(evaluate.main, tmp_path, capsys=capsys)
    assert "task.beam_size is not an option of a lm checkpoint" in error(evaluate.main, lm_ckpt, "--beam", 2,
                                                                         capsys=capsys)
    assert "--files scores translation" in error(evaluate.main, lo_run, "--files", tmp_path / "bad.ckpt",
                                                 capsys=capsys)
    assert "is a lm checkpoint" in error(translate.main, lm_ckpt, capsys=capsys)
    assert "is a translation checkpoint" in error(generate.main, tr_ckpt, capsys=capsys)
    assert "model.max_len" in error(generate.main, lm_ckpt, "--max-new-tokens", 600, capsys=capsys)
    (tmp_path / "long.src").write_text("a b\n" + "a " * 1500 + "\n")  # over the default max_len of 1024
    assert "long.src line 2 has" in error(translate.main, tr_ckpt, "--input", tmp_path / "long.src", capsys=capsys)
    monkeypatch.setattr(listops, "VOCAB", (*listops.VOCAB[:-1], "X"))  # code whose vocabulary changed since
    assert "vocabulary" in error(evaluate.main, lo_run, capsys=capsys)
