"""A user's first mistakes: each is one ``error: ...`` line naming the problem and the fix, exit status 2, before any
data is built, with "did you mean" where a name is close to a real one: invalid optimiser numbers, a checkpoint of
another task or model shape, Hydra's unknown keys and config names, unusable paths and arguments of the other
commands (refused before torch loads)."""

import sys

import pytest
import torch

from efficient_attn_tasks.commands import train
from efficient_attn_tasks.commands.cli import close_options
from efficient_attn_tasks.config.checks import ConfigError, check_config
from efficient_attn_tasks.config.schema import OptimConfig
from efficient_attn_tasks.run.resume import check_checkpoint
from tests.helpers import config


def train_main(monkeypatch, tmp_path, *args: str) -> int:
    """``efficient-attn-train args`` in this process (run from ``tmp_path``): its exit status."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["efficient-attn-train", *args])
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as stop:
        train.main()
    return stop.value.code


@pytest.mark.parametrize("override, message", [
    ("optim.lr=-1", "optim.lr must be a number > 0, got -1"),
    ("optim.lr=0", "optim.lr must be a number > 0, got 0"),
    ("optim.lr=nan", "optim.lr must be a number > 0, got nan"),
    ("optim.weight_decay=-0.1", "optim.weight_decay must be a number >= 0"),
    ("optim.betas=[0.9,1.0]", "optim.betas must be two numbers in [0, 1)"),
    ("optim.betas=[0.9]", "optim.betas must be two numbers in [0, 1)"),
])
def test_invalid_optimiser_numbers_are_config_errors(override, message):
    with pytest.raises(ConfigError, match="^" + message.replace("[", r"\[").replace(")", r"\)")):
        check_config(config(override))


def test_valid_optimiser_numbers_pass():
    OptimConfig(lr=1, weight_decay=0, betas=(0.0, 0.999))


@pytest.mark.parametrize("override, line", [
    ("task.min_lenght=10", "error: unknown config key task.min_lenght; did you mean task.min_length=10?"),
    ("optim.lrr=1", "error: unknown config key optim.lrr; did you mean optim.lr=1?"),
    ("experment=quickstart", "error: unknown config key experment; did you mean experiment=quickstart?"),
    ("attention=sofmax", "error: attention=sofmax: no such config; did you mean attention=softmax?"),
    ("experiment=mqar/quik", "error: experiment=mqar/quik: no such config; did you mean experiment=mqar/quick?"),
    ("hydra/launcher=jobli", "error: hydra/launcher=jobli: no such config; did you mean hydra/launcher=joblib?"),
])
def test_hydra_mistakes_are_one_line_with_did_you_mean(monkeypatch, tmp_path, capfd, override, line):
    code = train_main(monkeypatch, tmp_path, override, "--cfg", "job")
    err = capfd.readouterr().err
    assert code == 2 and err.strip() == line, err
    assert not (tmp_path / "outputs").exists()


def test_unparsable_override_is_one_line(monkeypatch, tmp_path, capfd):
    code = train_main(monkeypatch, tmp_path, "optim.lr=[1", "--cfg", "job")
    err = capfd.readouterr().err
    assert code == 2 and err.startswith("error: ") and "override_grammar" in err and len(err.splitlines()) == 1


def test_attention_typo_names_the_family():
    options = ["favor_hyp", "favor_plus", "favor_relu", "softmax", "sliding_window", "sliding_window_w16"]
    assert close_options("favr", options) == ["favor_hyp", "favor_plus", "favor_relu"]
    assert close_options("favor_pluss", options) == ["favor_plus"]
    assert close_options("zzz", options) == []


def test_other_errors_keep_hydras_report(monkeypatch, tmp_path, capfd):
    """Only the composition mistakes change: a key added with + that the checks refuse is still theirs."""
    code = train_main(monkeypatch, tmp_path, "++optim.lrr=1", "logger=none")
    err = capfd.readouterr().err
    assert code == 2 and err.strip() == "error: unknown config key optim.lrr; did you mean optim.lr?", err


def save_checkpoint(path, cfg) -> str:
    from omegaconf import OmegaConf

    torch.save({"hyper_parameters": {"config": OmegaConf.to_container(cfg, resolve=True)}, "state_dict": {}}, path)
    return str(path)


def test_checkpoint_of_another_task_is_refused_before_the_data(tmp_path):
    lm = config("task=lm")
    check_config(lm)
    ckpt = save_checkpoint(tmp_path / "lm.ckpt", lm)
    mqar = config("task=mqar")
    check_config(mqar)
    with pytest.raises(ConfigError, match=r"is a checkpoint of task 'lm', but this run's task is 'mqar'"):
        check_checkpoint(ckpt, mqar)
    check_checkpoint(ckpt, lm)  # its own config: fine


def test_checkpoint_of_another_shape_names_the_keys(tmp_path):
    cfg = config("task=mqar")
    check_config(cfg)
    ckpt = save_checkpoint(tmp_path / "a.ckpt", cfg)
    other = config("task=mqar", "model.d_model=32", "task.vocab_size=100", "model.dropout=0.3")
    check_config(other)
    with pytest.raises(ConfigError, match=r"task.vocab_size=100 \(checkpoint: 8192\), model.d_model=32 "
                                          r"\(checkpoint: \d+\); set them"):
        check_checkpoint(ckpt, other)
    check_checkpoint(ckpt, config("task=mqar", "model.dropout=0.3", "trainer.max_steps=5"))  # no shape: fine


def test_a_run_checks_its_checkpoint_before_building_the_data(tmp_path, monkeypatch):
    from efficient_attn_tasks.run.fit import run
    from efficient_attn_tasks.tasks import task_module
    from tests.helpers import tiny_cfg

    lm = tiny_cfg("lm", "softmax")
    check_config(lm)
    ckpt = save_checkpoint(tmp_path / "lm.ckpt", lm)
    cfg = tiny_cfg("mqar", "softmax", f"ckpt_path={ckpt}")
    monkeypatch.setattr(task_module("mqar"), "build", lambda *a, **k: pytest.fail("the data was built"))
    with pytest.raises(ConfigError, match="is a checkpoint of task 'lm', but this run's task is 'mqar'"):
        run(cfg, tmp_path / "run")


def test_a_file_that_is_no_checkpoint_is_one_error(tmp_path):
    (tmp_path / "x.ckpt").write_text("junk")
    with pytest.raises(ConfigError, match="is not a checkpoint file"):
        check_checkpoint(str(tmp_path / "x.ckpt"), config())
    torch.save({"weights": torch.zeros(1)}, tmp_path / "y.ckpt")
    with pytest.raises(ConfigError, match="is not a checkpoint of efficient-attn-train"):
        check_checkpoint(str(tmp_path / "y.ckpt"), config())


def command(main, argv, capsys) -> tuple[int, str]:
    """(exit status, stderr) of a command's ``main(argv)`` run in this process."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    return stop.value.code, capsys.readouterr().err


def test_approx_with_a_missing_checkpoint_creates_nothing(tmp_path, capsys):
    from efficient_attn_tasks.commands import approx

    code, err = command(approx.main, ["--checkpoint", str(tmp_path / "no.ckpt"), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and err == f"error: --checkpoint {tmp_path / 'no.ckpt'}: no such checkpoint file or run dir; " \
                                "check the path\n"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name, argv", [
    ("approx", ["--quick", "--out", "{out}"]),
    ("approx", ["--study", "sqrt_dk", "--out", "{out}"]),
    ("report", ["{tmp}", "--out", "{out}/table"]),
    ("report", ["{tmp}", "--plot", "{out}/p.png", "--x", "config.seed"]),
    ("bench", ["--quick", "--out", "{out}"]),
    ("gpu_bench", ["--quick", "--device", "cpu", "--out", "{out}"]),
])
def test_an_output_folder_that_cannot_be_written_is_one_line(tmp_path, capsys, monkeypatch, name, argv):
    """Under a file, or read-only (os.access: the tests may run as root, for whom chmod changes nothing)."""
    import importlib

    main = importlib.import_module(f"efficient_attn_tasks.commands.{name}").main
    for work in ("approx.report", "approx.scaling", "report.tables", "bench.kernels", "bench.gpu"):  # none runs
        monkeypatch.setattr(f"efficient_attn_tasks.{work}.run", lambda *a, **k: pytest.fail("the work ran"))
    (tmp_path / "file").write_text("")
    under_file = [a.format(out=tmp_path / "file" / "sub", tmp=tmp_path) for a in argv]
    code, err = command(main, under_file, capsys)
    assert code == 2 and err.startswith("error: --") and "file is a file, not a folder" in err, err
    assert len(err.splitlines()) == 1
    monkeypatch.setattr("os.access", lambda path, mode: False)
    code, err = command(main, [a.format(out=tmp_path / "ro" / "sub", tmp=tmp_path) for a in argv], capsys)
    assert code == 2 and "is not writable (read-only)" in err and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.parametrize("name, argv, line", [
    ("evaluate", ["{missing}"], "error: {missing} is neither a checkpoint file nor a run dir"),
    ("evaluate", ["{ckpt}", "--beam", "0"], "error: --beam must be >= 1, got 0"),
    ("evaluate", ["{ckpt}", "--batch-size", "-1"], "error: --batch-size must be >= 1, got -1"),
    ("evaluate", ["{ckpt}", "--files", "{ckpt}", "{ckpt}", "{ckpt}"],
     "error: --files takes SRC REF (translation) or TEXT (lm), got 3 files"),
    ("evaluate", ["{ckpt}", "--files", "{missing}"], "error: --files: no such file {missing}"),
    ("evaluate", ["{ckpt}", "--split", "train"], "efficient-attn-eval: error: argument --split: invalid choice"),
    ("evaluate", ["{ckpt}", "--attention", "favor_pluss"],
     "error: --attention favor_pluss: no attention config 'favor_pluss' (configs/attention/); "
     "did you mean favor_plus?"),
    ("evaluate", ["{ckpt}", "--attention-kwargs", "num_features=8"],
     "error: --attention-kwargs changes the attention swapped in: give --attention NAME too"),
    ("translate", ["{missing}"], "error: {missing} is neither a checkpoint file nor a run dir"),
    ("translate", ["{ckpt}", "--beam", "0"], "error: --beam must be >= 1, got 0"),
    ("translate", ["{ckpt}", "--input", "{missing}"], "error: --input {missing} is not a file"),
    ("generate", ["{missing}"], "error: {missing} is neither a checkpoint file nor a run dir"),
    ("generate", ["{ckpt}", "--prompt", ""], "error: --prompt is empty: give the text to continue"),
    ("generate", ["{ckpt}", "--top-k", "-1"], "error: --top-k must be >= 0, got -1"),
    ("generate", ["{ckpt}", "--max-new-tokens", "-5"], "error: --max-new-tokens must be >= 0, got -5"),
])
def test_checkpoint_commands_refuse_bad_arguments_before_loading(tmp_path, capsys, monkeypatch, name, argv, line):
    """Nothing is loaded: the checkpoint here is an empty file, and loading one is an error of its own."""
    import importlib

    main = importlib.import_module(f"efficient_attn_tasks.commands.{name}").main
    monkeypatch.setattr("efficient_attn_tasks.inference.checkpoint.load", lambda *a, **k: pytest.fail("loaded"))
    (tmp_path / "a.ckpt").write_bytes(b"")
    fill = {"ckpt": tmp_path / "a.ckpt", "missing": tmp_path / "none"}
    code, err = command(main, [a.format(**fill) for a in argv], capsys)
    assert code == 2 and err.startswith(line.format(**fill)) and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("name, argv", [
    ("evaluate", ["/no/such.ckpt"]),
    ("translate", ["/no/such.ckpt", "--beam", "0"]),
    ("generate", ["/no/such.ckpt", "--prompt", ""]),
])
def test_bad_arguments_are_refused_before_torch_loads(name, argv):
    """In a fresh process: the refusal imports neither torch nor Lightning (seconds on a busy machine)."""
    import subprocess

    code = (f"import sys\nfrom efficient_attn_tasks.commands.{name} import main\n"
            f"try:\n    main({argv!r})\nexcept SystemExit as e:\n    assert e.code == 2, e.code\n"
            "heavy = [m for m in ('torch', 'pytorch_lightning') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stderr.startswith("error: ") and len(out.stderr.splitlines()) == 1, out.stderr


@pytest.mark.parametrize("argv0", ["/usr/local/bin/efficient-attn-train", "-m"])
def test_a_command_without_the_train_extra_names_the_install_in_one_line(argv0):
    """An install without the train extra (hydra blocked here): the console command says what to install; an
    import from Python raises the ImportError."""
    import subprocess

    code = ("import sys\nsys.modules['hydra'] = None\n"
            f"sys.argv = [{argv0!r}, 'experiment=quickstart']\n"
            "from efficient_attn_tasks.commands.train import main\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr == (
        'error: the training and evaluation commands need the train extra (hydra not installed): '
        'pip install "efficient-attn[train]"\n'), out.stderr
    library = subprocess.run([sys.executable, "-c", "import sys\nsys.modules['hydra'] = None\n"
                              "import efficient_attn_tasks"], capture_output=True, text=True, timeout=120)
    assert library.returncode == 1 and "ImportError: the training and evaluation commands" in library.stderr


def test_multirun_with_cfg_is_one_line(monkeypatch, tmp_path, capfd):
    code = train_main(monkeypatch, tmp_path, "-m", "experiment=quickstart", "--cfg", "job")
    err = capfd.readouterr().err
    assert code == 2 and err.startswith("error: Only one of --run, --multirun") and len(err.splitlines()) == 1, err


def test_a_key_only_the_swept_attentions_have_gets_the_sweep_fix(monkeypatch, tmp_path, capfd):
    """In a -m run Hydra applies a plain override to its first composition too (softmax here, without the key)."""
    sweep = ["-m", "attention=favor_plus,favor_m64", "attention.kwargs.redraw_interval=500"]
    code = train_main(monkeypatch, tmp_path, *sweep)
    err = capfd.readouterr().err
    assert code == 2 and err.strip() == (
        "error: unknown config key attention.kwargs.redraw_interval before the sweep's values are set: in a -m run, "
        "give a key that only the swept options have as a one-value sweep, attention.kwargs.redraw_interval=choice(500)"
    ), err
    assert not (tmp_path / "multirun").exists()
