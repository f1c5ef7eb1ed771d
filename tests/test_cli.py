"""The command line: --help and a bare run explain the app, start-up stays light (no torch before the task's
module is needed, no W&B before a run starts), logs suit a non-terminal, data errors name every missing file; the other
commands' --help (every option with its default, examples, outputs, no torch or scipy), the compact
multirun summary, the thread count of parallel sweep jobs."""

import argparse
import functools
import inspect
import io
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from scipy import stats as scipy_stats

from efficient_attn_tasks.commands import approx, bench, evaluate, generate, report, translate
from efficient_attn_tasks.commands.cli import HelpFormatter
from efficient_attn_tasks.commands.train import RunSummary
from efficient_attn_tasks.config.checks import CONFIG_DIR, trainer_arguments
from efficient_attn_tasks.report.stats import as_number
from efficient_attn_tasks.report.summary import summarize, summary
from efficient_attn_tasks.run.callbacks import progress_bar
from efficient_attn_tasks.run.fit import default_threads, run
from efficient_attn_tasks.run.record import RunRecord
from efficient_attn_tasks.run.resume import remove_unstarted_run_dir
from efficient_attn_tasks.tasks import data, translation, translation_data
from efficient_attn_tasks.tasks.data import DataError
from tests.helpers import TINY_TRANSLATION, config

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
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


def _fresh_python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)


def test_importing_the_app_loads_neither_torch_nor_lightning_nor_wandb():
    out = _fresh_python(
        "import sys, efficient_attn_tasks.commands.train\n"
        f"loaded = [m for m in {(*HEAVY, 'torch')!r} if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    assert out.returncode == 0, out.stderr


def _check_fails(overrides: list[list[str]], then: str) -> subprocess.CompletedProcess:
    """check_config in a fresh interpreter refuses each of ``overrides``; then runs ``then`` (assertions)."""
    return _fresh_python(
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


# ----------------------------------------------------------------------------- bench, approx, report --help
COMMANDS = {  # console script -> (module run by `python -m`, extra argv, parser builder)
    "efficient-attn-bench": ("efficient_attn_tasks.commands.bench", [], bench.parser),
    "efficient-attn-approx": ("efficient_attn_tasks.commands.approx", [], approx.parser),
    "efficient-attn-approx --study sqrt_dk": ("efficient_attn_tasks.commands.approx", ["--study", "sqrt_dk"],
                                              functools.partial(approx.parser, "sqrt_dk")),
    "efficient-attn-report": ("efficient_attn_tasks.commands.report", [], report.parser),
    "efficient-attn-eval": ("efficient_attn_tasks.commands.evaluate", [], evaluate.parser),
    "efficient-attn-translate": ("efficient_attn_tasks.commands.translate", [], translate.parser),
    "efficient-attn-generate": ("efficient_attn_tasks.commands.generate", [], generate.parser),
}
NOT_FOR_HELP = ("torch", "scipy", "matplotlib", "pandas", "pytorch_lightning", "lightning")


@pytest.mark.parametrize("command", COMMANDS)
def test_help_has_examples_outputs_and_every_option_with_its_default(command):
    module, extra, build = COMMANDS[command]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", module, *extra, "--help"], capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=60)
    seconds = time.perf_counter() - start
    assert out.returncode == 0, out.stderr
    text = out.stdout
    examples = text[text.index("\nexamples:\n"):text.index("\noutputs:\n")]
    name = command.split()[0]
    assert len(re.findall(rf"^  {name} ", examples, flags=re.M)) == 3, examples
    actions = build()._actions
    if any("--out" in action.option_strings for action in actions):
        assert "--out" in text[text.index("\noutputs:\n"):]  # where the files go
    else:
        assert "stdout" in text[text.index("\noutputs:\n"):]  # commands without --out write to stdout
    formatter = HelpFormatter(name)
    for action in actions:
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{command}: {action.option_strings or action.dest} has no help"
        for option in action.option_strings:
            assert re.search(rf"(^|[\s,]){re.escape(option)}\b", text), f"{command}: {option} not in --help"
        if action.option_strings:  # shown with its default: "(default: ...)" or the help's own "default ..."
            assert "default" in formatter._get_help_string(action), f"{command}: {action.option_strings}"
    assert seconds < 10, seconds  # measured ~0.3 s; the import check below is the real guard


def test_every_command_is_a_console_script_of_its_module():
    import tomllib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    for command, (module, _, _) in COMMANDS.items():
        assert scripts.get(command.split()[0]) == f"{module}:main", command


@pytest.mark.parametrize("module", [f"efficient_attn_tasks.commands.{name}" for name in
                                    ("bench", "approx", "evaluate", "translate", "generate", "report")])
def test_no_arguments_prints_the_help_instead_of_a_long_run(module):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", module], capture_output=True, text=True, env=env, cwd=REPO,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage:") and "\nexamples:\n" in out.stdout, out.stdout[:300]
    assert not re.search(r"^wrote ", out.stdout + out.stderr, flags=re.M)  # nothing was run


@pytest.mark.parametrize("command", COMMANDS)
def test_help_imports_neither_torch_nor_scipy(command):
    module, extra, _ = COMMANDS[command]
    out = _fresh_python(
        "import contextlib, io, sys\n"
        f"from {module} import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n"
        f"        main({[*extra, '--help']!r})\n"
        "    except SystemExit as exit:\n"
        "        assert exit.code == 0, exit.code\n"
        f"loaded = [m for m in {NOT_FOR_HELP!r} if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    assert out.returncode == 0, out.stderr


def test_approx_says_where_it_wrote(tmp_path, capsys):
    approx.main(["--study", "sqrt_dk", "--dims", "8", "--length", "8", "--draws", "2", "--out", str(tmp_path)])
    wrote = re.findall(r"^wrote (.+)$", capsys.readouterr().out, flags=re.M)
    assert wrote == [str(tmp_path / "sqrt_dk.csv"), str(tmp_path / "sqrt_dk.png")]
    assert all(Path(p).stat().st_size > 0 for p in wrote)


# ----------------------------------------------------------------------------- the multirun summary
def _job(root: Path, num: int, choice: str, seed: int, score: float | None, lr: float = 1e-3) -> None:
    """A fake multirun job dir: .hydra/ with its choices, job number and overrides; results.json unless
    ``score`` is None (a failed job)."""
    run_dir = root / f"{num}_{choice}"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "hydra.yaml").write_text(
        f"hydra:\n  job:\n    num: {num}\n  runtime:\n    choices:\n      attention: {choice}\n"
        "      task: translation\n")
    (run_dir / ".hydra" / "overrides.yaml").write_text(
        f"- attention={choice}\n- seed={seed}\n- optim.lr={lr}\n- experiment=quickstart\n")
    if score is None:
        return
    record = {"name": "quickstart", "task": "translation", "attention": choice.split("_")[0], "seed": seed,
              "config": {"seed": seed, "optim": {"lr": lr}},
              "metrics": {"monitor": "val/bleu", "val_best": score - 1, "val_last": {"val/bleu": score - 1},
                          "test": {"test/bleu": score, "test/loss": 1.0}},
              "num_parameters": 1000, "steps": 100, "train_tokens_per_s": 2000.0 + seed, "peak_memory_mib": 500.0,
              "wall_time_s": 60.0}
    (run_dir / "results.json").write_text(json.dumps(record))


def _failed(root: Path, num: int, choice: str, seed: int, steps: int = 0) -> Path:
    """A fake failed job: its .hydra/ and a failed record (efficient_attn_tasks/run/record.py ``failed_record``)."""
    _job(root, num, choice, seed, None)
    record = {"name": "quickstart", "task": "translation", "attention": choice, "seed": seed, "status": "failed",
              "error": {"type": "DataError", "message": f"job {num} has no data; set data_dir"}, "steps": steps}
    (root / f"{num}_{choice}" / "results.json").write_text(json.dumps(record))
    return root / f"{num}_{choice}"


def _table(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("|")]


def test_multirun_summary_is_compact_in_launch_order_with_ci_and_failed_runs(tmp_path):
    for num, (choice, seed, score) in enumerate([("softmax", 0, 30.0), ("favor_plus", 0, 29.0), ("softmax", 1, 32.0),
                                                 ("favor_plus", 1, 27.0), ("linear", 0, None), ("bilinear", 0, 20.0),
                                                 ("additive", 0, 25.0), ("dot", 0, 21.0), ("taylor", 0, 22.0),
                                                 ("hedgehog", 0, 23.0), ("cosformer", 0, 24.0)]):
        _job(tmp_path, num, choice, seed, score)
    text = summary(tmp_path)
    rows = _table(text)
    assert rows[0] == ["attention", "n", "test/bleu", "tokens/s", "peak MiB", "wall s"]
    labels = [r[0] for r in rows[2:]]
    assert labels[:-1] == ["softmax", "favor_plus", "bilinear", "additive", "dot", "taylor", "hedgehog", "cosformer"]
    half = scipy_stats.t.ppf(0.975, 1) * scipy_stats.tstd([30.0, 32.0]) / 2 ** 0.5
    assert rows[2] == ["softmax", "2", f"31 ± {as_number(half)}", "2,000", "500", "60"]  # tokens/s: mean of 2000, 2001
    assert rows[3][:3] == ["favor_plus", "2", f"28 ± {as_number(half)}"]  # the config name, not the registry's favor
    assert rows[4][:3] == ["bilinear", "1", "20"]  # one seed: no interval
    assert labels[-1].startswith("linear (no results.json, seed 0, job 4") and rows[-1][1:] == ["0", *["n/a"] * 4]
    assert text.splitlines()[0] == f"10 run(s) in {tmp_path}, 1 without results.json"
    assert text.splitlines()[-1] == f"Full table (every metric): efficient-attn-report {tmp_path} --rows attention --ci"


def test_multirun_summary_lists_failed_jobs_with_run_dir_and_error_apart_from_the_means(tmp_path):
    _job(tmp_path, 0, "softmax", 0, 30.0)
    first = _failed(tmp_path, 1, "softmax", 1, steps=7)
    _job(tmp_path, 2, "softmax", 2, 32.0)
    _job(tmp_path, 3, "linear", 0, None)  # no results.json
    second = _failed(tmp_path, 4, "favor_plus", 0)
    text, failed = summarize(tmp_path)
    assert failed == 3  # the exit code's count: failed records and jobs without results.json
    lines = text.splitlines()
    assert lines[0] == f"2 run(s) in {tmp_path}, 2 failed, 1 without results.json"
    rows = _table(text)
    assert rows[2][:3] == ["softmax", "2", "31 ± 12.71"]  # seeds 0 and 2 only
    assert [r[0] for r in rows[3:]] == ["softmax (failed at step 7, seed 1, job 1)",
                                       "linear (no results.json, seed 0, job 3: failed, killed or running)",
                                       "favor_plus (failed at step 0, seed 0, job 4)"]
    start = lines.index("Failed jobs (results.json status failed; ckpt_path=last with the same hydra.sweep.dir runs "
                        "them again):")
    assert lines[start + 1:] == [f"  {first}: DataError: job 1 has no data; set data_dir",
                                 f"  {second}: DataError: job 4 has no data; set data_dir",
                                 f"Full table (every metric): efficient-attn-report {tmp_path} --rows attention --ci"]


def test_the_sweep_exits_1_after_its_summary_when_a_job_failed(tmp_path, capsys):
    from omegaconf import OmegaConf

    _job(tmp_path, 0, "softmax", 0, 30.0)
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    RunSummary().on_multirun_end(config)  # every job finished: no exit
    assert capsys.readouterr().out.startswith(f"\n1 run(s) in {tmp_path}\n")
    _failed(tmp_path, 1, "softmax", 1)
    with pytest.raises(SystemExit) as exit_:
        RunSummary().on_multirun_end(config)
    out = capsys.readouterr()
    assert exit_.value.code == 1 and "Failed jobs" in out.out and "1 job(s) of the sweep failed" in out.err


def test_every_multirun_ends_with_the_summary():
    for overrides in ([], ["experiment=quickstart"], ["experiment=mqar/quick"]):
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose("train", overrides=overrides, return_hydra_config=True)
        targets = [c._target_ for c in cfg.hydra.callbacks.values()]
        assert targets == ["efficient_attn_tasks.run.lock.RunDirGuard",
                           "efficient_attn_tasks.commands.train.RunSummary"], overrides


def test_multirun_summary_splits_rows_by_other_swept_values(tmp_path, capsys):
    for num, (lr, seed, score) in enumerate([(1e-3, 0, 30.0), (1e-3, 1, 31.0), (3e-3, 0, 20.0), (3e-3, 1, 22.0)]):
        _job(tmp_path, num, "softmax", seed, score, lr=lr)
    text = summary(tmp_path)
    rows = _table(text)
    assert rows[0][0] == "attention / optim.lr" and [r[:2] for r in rows[2:]] == [["softmax / 0.001", "2"],
                                                                                  ["softmax / 0.003", "2"]]
    command = text.splitlines()[-1].split(": ", 1)[1]
    assert command == f"efficient-attn-report {tmp_path} --rows attention,config.optim.lr --ci"
    report.main(command.split()[1:])  # the printed command works and gives the same rows
    full = _table(capsys.readouterr().out)
    assert [r[:2] for r in full[2:]] == [["softmax / 0.001", "2"], ["softmax / 0.003", "2"]]


# ----------------------------------------------------------------------------- threads of parallel sweep jobs
@pytest.mark.parametrize("threads, n_jobs, cpus, expected", [
    (None, None, 16, None),  # not under joblib: torch's default
    (None, 2, 16, 8),  # 2 jobs at once share 16 cores
    (None, 3, 2, 1),  # never below one thread
    (None, 1, 16, None),  # one job at a time: torch's default
    (None, -1, 8, 1),  # joblib's -1: as many jobs as CPUs
    (None, -3, 8, 1),  # 8 + 1 - 3 = 6 jobs
    (None, -7, 8, 4),  # 2 jobs
    (4, 2, 16, 4),  # an explicit threads=N wins
    (0, 2, 16, 8),  # 0 is unset, as in the config check
])
def test_default_threads(threads, n_jobs, cpus, expected):
    assert default_threads(threads, n_jobs, cpus) == expected


APP = """
import os, sys
import hydra
from hydra.core.config_store import ConfigStore
from efficient_attn_tasks.run.fit import default_threads, joblib_n_jobs

@hydra.main(version_base="1.3", config_path=None, config_name="cfg")
def app(cfg):  # one file per job: parallel jobs' prints would interleave
    with open(f"job{cfg.x}.txt", "w") as f:
        f.write(f"JOB {cfg.x} {joblib_n_jobs()} {default_threads(None, joblib_n_jobs(), 4)}")

ConfigStore.instance().store(name="cfg", node={"x": 0, "defaults": ["_self_", {"override hydra/launcher": "joblib"}]})
app()
"""


def test_joblib_jobs_are_read_from_the_hydra_config(tmp_path):
    (tmp_path / "app.py").write_text(APP)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}

    def jobs(*args: str) -> list[str]:
        out = subprocess.run([sys.executable, "app.py", *args], capture_output=True, text=True, env=env, cwd=tmp_path,
                             timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        found = sorted(p.read_text() for p in tmp_path.glob("job*.txt"))
        for p in tmp_path.glob("job*.txt"):
            p.unlink()
        return found

    assert jobs("-m", "x=1,2", "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={tmp_path / 'm'}") == \
        ["JOB 1 2 2", "JOB 2 2 2"]  # 4 CPUs // 2 jobs
    assert jobs("x=3", f"hydra.run.dir={tmp_path / 'r'}") == ["JOB 3 None None"]  # a single run
