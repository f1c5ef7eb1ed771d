"""The other console commands (bench, approx, report, eval, translate, generate) on the command line: --help has
examples, outputs and every option with its default, and imports neither torch nor scipy; each command is its
module's console script; no arguments prints the help; approx says where it wrote."""

import argparse
import functools
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from efficient_attn_tasks.commands import approx, bench, evaluate, generate, report, translate
from efficient_attn_tasks.commands.cli import HelpFormatter
from tests.helpers import REPO, fresh_python

pytestmark = pytest.mark.usefixtures("one_thread")

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
    out = fresh_python(
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


