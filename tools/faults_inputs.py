"""Fault injection for the training stack, the user's inputs: bad values and data, the same run dir twice, Ctrl-C and
resume, the first week's mistakes, each run as a user types the command; and the rows of the report's "first
week" table.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from efficient_attn_tasks.run.fit import run
from efficient_attn_tasks.run.record import RESULTS_JSON, RunRecord
from tests.helpers import tiny_overrides
from tools.faults_scenarios import REPO, TINY, compose_config

QUIET = ["model=tiny", "logger=none", "test=false", "threads=1", "trainer.enable_progress_bar=false"]
BAD_INPUTS = [  # (what, overrides, expected exit code)
    ("unknown attention", ["attention=softmx"], 2),
    ("unknown task", ["task=mt"], 2),
    ("unknown config group", ["optimizer=adam"], 2),
    ("misspelled key", ["task=listops", "++task.min_lenght=10"], 2),
    ("d_model not divisible by heads", ["model.d_model=30"], 2),
    ("unknown attention option", ["attention=favor_plus", "++attention.kwargs.num_feature=8"], 2),
    ("causal cross-attention site", ["task=translation", "task.source=synthetic",
                                     "++model.cross_attention={name: softmax, kwargs: {causal: true}}"], 2),
    ("data dir missing, no network", ["task=translation", "data_dir=/nonexistent/data"], 2),
    ("ListOps impossible lengths", ["task=listops", "task.min_length=1", "task.max_length=3"], 2),
    ("resume with no earlier run", ["task=listops", "ckpt_path=last"], 2),
    ("checkpoint file missing", ["task=listops", "ckpt_path=/nonexistent.ckpt"], 2),
]


def data_inputs(work: Path) -> list[tuple[str, list[str], int, dict[str, str], str]]:
    """Bad files and a bad W&B key: (what, overrides, expected exit, extra env, the line to report)."""
    corrupt = work / "corrupt" / "multi30k"
    corrupt.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val", "test_2016_flickr"):
        for lang in ("en", "de"):
            (corrupt / f"{split}.{lang}.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    words = ["ab cd", "ef gh ab", "cd ef", "gh ab cd ef"]
    text = {"src": [words[i % 4] for i in range(40)], "tgt": [words[(i + 1) % 4] for i in range(40)]}
    text["src"][3], text["tgt"][7] = "", " ".join(["ab"] * 300)  # one empty, one overlong pair
    for name, lines in {**text, "short": text["tgt"][:39]}.items():
        (work / f"{name}.txt").write_text("\n".join(lines) + "\n")
    files = lambda tgt: (f"++task.files={{train: [{work}/src.txt, {work}/{tgt}.txt], "  # noqa: E731
                         f"val: [{work}/src.txt, {work}/tgt.txt], test: [{work}/src.txt, {work}/tgt.txt]}}")
    small = ["task=translation", "task.source=files", "task.vocab_size=24", "trainer.max_steps=1"]
    return [
        ("corrupt gz in the data dir", ["task=translation", f"data_dir={corrupt.parent}"], 2, {}, "error:"),
        ("parallel files of unequal length", [*small, files("short")], 2, {}, "error:"),
        ("an empty and an overlong training pair", [*small, files("tgt")], 0, {}, "translation: dropped"),
        ("W&B: a bad API key and no network", ["task=listops", "logger=wandb", "logger.init_timeout=5",
                                               "trainer.max_steps=1", "task.train_size=64", "task.val_size=16",
                                               "task.test_size=16", "task.min_length=10", "task.max_length=40"],
         0, {"WANDB_MODE": "", "WANDB_API_KEY": "x" * 40, "HOME": str(work)}, "UserWarning: W&B online start failed"),
    ]


def bad_inputs(work: Path) -> list[dict[str, Any]]:
    """Each bad input through the console command: exit code, seconds, and the line it printed."""
    rows = []
    base_env = {**os.environ, "WANDB_MODE": "disabled", "EFFICIENT_ATTN_DATA": "/nonexistent/data",
                "https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"}
    work.mkdir(parents=True, exist_ok=True)
    cases = [(what, overrides, expected, {}, "") for what, overrides, expected in BAD_INPUTS] + data_inputs(work)
    for what, overrides, expected, env, marker in cases:
        env = {k: v for k, v in {**base_env, **env}.items() if v != ""}
        start = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "efficient_attn_tasks.commands.train", *QUIET, *overrides],
                              cwd=work, env=env, capture_output=True, text=True, timeout=300)
        lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        starts = (marker,) if marker else ("error:", "Could not", "In ")
        message = next((ln for ln in lines if ln.startswith(starts) or (marker and marker in ln)),
                       lines[-1] if lines else "")
        rows.append({"input": what, "overrides": " ".join(o.replace(str(work), "<work>") for o in overrides),
                     "returncode": proc.returncode, "expected": expected, "seconds": time.monotonic() - start,
                     "message": message.replace(str(work), "<work>")})
    return rows


# ----------------------------------------------------------------------------- a user's first week
TRAIN = [sys.executable, "-m", "efficient_attn_tasks.commands.train"]
SHORT = [*TINY, "trainer.max_steps=3"]  # a finished run in a few seconds
INTERRUPT_BATCHES = 20  # batches an epoch: Ctrl-C lands mid-epoch


def _env(**extra: str) -> dict[str, str]:
    """The environment of a console command here: W&B off, no network, this checkout importable."""
    env = {**os.environ, "WANDB_MODE": "disabled", "EFFICIENT_ATTN_DATA": "/nonexistent/data", "HYDRA_FULL_ERROR": "0",
           "https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9",
           "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **extra}
    return {k: v for k, v in env.items() if v != ""}


def _lines(text: str) -> list[str]:
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


def _contents(run_dir: Path) -> dict[str, bytes]:
    """Every file of ``run_dir`` (results.json, .hydra/, checkpoints/, ...) but the lock, by relative path."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name != ".run.lock"}


def same_run_dir_twice(work: Path) -> dict[str, Any]:
    """A finished tiny run, then the same command with the same ``hydra.run.dir``: the second's exit code and
    stderr, and whether the first run's files (results.json, .hydra/, checkpoints/) are byte for byte intact."""
    run_dir = work / "run"
    work.mkdir(parents=True, exist_ok=True)
    cmd = [*TRAIN, *SHORT, f"hydra.run.dir={run_dir}"]
    first = subprocess.run(cmd, cwd=work, env=_env(), capture_output=True, text=True, timeout=300)
    if first.returncode != 0:
        raise RuntimeError(f"first run failed:\n{first.stderr[-3000:]}")
    before = _contents(run_dir)
    start = time.monotonic()
    second = subprocess.run(cmd, cwd=work, env=_env(), capture_output=True, text=True, timeout=300)
    seconds = time.monotonic() - start
    after = _contents(run_dir)
    return {"first_returncode": first.returncode, "returncode": second.returncode, "seconds": seconds,
            "stderr": _lines(second.stderr), "intact": after == before and RESULTS_JSON in before,
            "hydra_files": sorted(k for k in before if k.startswith(".hydra")),
            "checkpoints": sorted(k.split("/", 1)[1] for k in after if k.startswith("checkpoints/")),
            "run_dir": str(run_dir)}


def ctrl_c_and_resume(work: Path, steps: int = 600) -> dict[str, Any]:
    """``efficient-attn-train`` (a tiny ListOps run, no hydra.run.dir) gets SIGINT once it is in its second
    epoch. Before that, while it trains, a second run is started with its run dir (the lock must refuse it).
    Then the resume command the interrupted run printed is run: exit codes, lines, records, steps."""
    overrides = [*tiny_overrides("listops", f"task.train_size={16 * INTERRUPT_BATCHES}"), "threads=1",
                 "trainer.max_epochs=-1", f"trainer.max_steps={steps}", "test=false"]
    work.mkdir(parents=True, exist_ok=True)
    out, err = (work / "stdout.txt").open("w+"), (work / "stderr.txt").open("w+")
    proc = subprocess.Popen([*TRAIN, *overrides], cwd=work, env=_env(), stdout=out, stderr=err, text=True)
    start = time.monotonic()
    while "epoch 1" not in (work / "stdout.txt").read_text() and time.monotonic() - start < 300:
        if proc.poll() is not None:
            raise RuntimeError(f"the run ended before its second epoch:\n{(work / 'stderr.txt').read_text()[-3000:]}")
        time.sleep(0.05)
    (run_dir,) = [p.parent for p in work.glob("outputs/*/*/.hydra")]
    hydra_before = {k: v for k, v in _contents(run_dir).items() if k.startswith(".hydra")}
    started = time.monotonic()
    live = subprocess.run([*TRAIN, *overrides, f"hydra.run.dir={run_dir}"], cwd=work, env=_env(),
                          capture_output=True, text=True, timeout=300)
    live_seconds = time.monotonic() - started
    first_alive = proc.poll() is None  # the refusal came while the first run held the dir
    hydra_after = {k: v for k, v in _contents(run_dir).items() if k.startswith(".hydra")}
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    returncode = proc.wait(timeout=300)
    stop_seconds = time.monotonic() - sent
    out.close(), err.close()
    stderr = _lines((work / "stderr.txt").read_text())
    said = [ln for ln in stderr if ln.startswith("interrupted at step")]
    interrupted = RunRecord.read(run_dir / RESULTS_JSON) if (run_dir / RESULTS_JSON).exists() else None
    last = run_dir / "checkpoints" / "last.ckpt"
    saved_step = torch.load(last, map_location="cpu", weights_only=False)["global_step"] if last.exists() else None
    command = shlex.split(said[0].split("resume with: ", 1)[1]) if said and "resume with: " in said[0] else []
    resumed = subprocess.run([*TRAIN, *command[1:]], cwd=work, env=_env(), capture_output=True, text=True,
                             timeout=600) if command[:1] == ["efficient-attn-train"] else None
    finished = RunRecord.read(run_dir / RESULTS_JSON)
    return {"live_returncode": live.returncode, "live_stderr": _lines(live.stderr), "live_seconds": live_seconds,
            "first_alive": first_alive, "hydra_intact": hydra_before == hydra_after and bool(hydra_before),
            "returncode": returncode, "stop_seconds": stop_seconds, "said": said, "stderr_lines": len(stderr),
            "status": interrupted.status if interrupted else None,
            "interrupted_steps": interrupted.steps if interrupted else None, "saved_step": saved_step,
            "command": command, "resumed_returncode": resumed.returncode if resumed else None,
            "resumed_output": (resumed.stderr[-3000:] if resumed else ""), "final_status": finished.status,
            "final_steps": finished.steps, "resumed_from": finished.resumed_from, "max_steps": steps,
            "run_dirs": len(list(work.glob("outputs/*/*/.hydra"))), "work": str(work)}


def first_week_inputs(work: Path) -> list[dict[str, Any]]:
    """The start-time mistakes of results/reliability_door.md, each as a user types it (from ``work``): exit code,
    seconds, the line, and what it left behind (run dirs under outputs/, the approx --out). The checkpoint of
    another task is a tiny lm run's (made here), also the checkpoint efficient-attn-generate is given."""
    work.mkdir(parents=True, exist_ok=True)
    lm = work / "lm"
    if not (lm / "checkpoints" / "last.ckpt").exists():
        (work / "text.txt").write_text("To be, or not to be, that is the question.\n" * 40)
        run(compose_config(tiny_overrides("lm", "task.dataset=file", f"task.path={work / 'text.txt'}",
                                          "trainer.max_steps=1", "test=false", "threads=1")), lm)
    lm_ckpt = lm / "checkpoints" / "last.ckpt"
    module = lambda name: [sys.executable, "-m", f"efficient_attn_tasks.commands.{name}"]  # noqa: E731
    cases = [  # (key, shown command, argv)
        ("lr", "efficient-attn-train experiment=quickstart attention=softmax optim.lr=-1",
         [*TRAIN, "experiment=quickstart", "attention=softmax", "optim.lr=-1"]),
        ("other_task", "efficient-attn-train task=mqar attention=softmax ckpt_path=lm.ckpt",
         [*TRAIN, "task=mqar", "attention=softmax", f"ckpt_path={lm_ckpt}"]),
        ("min_lenght", "efficient-attn-train task.min_lenght=10", [*TRAIN, "task.min_lenght=10"]),
        ("lrr", "efficient-attn-train optim.lrr=1", [*TRAIN, "optim.lrr=1"]),
        ("favr", "efficient-attn-train attention=favr", [*TRAIN, "attention=favr"]),
        ("experment", "efficient-attn-train experment=quickstart", [*TRAIN, "experment=quickstart"]),
        ("approx", "efficient-attn-approx --checkpoint /no/such/path --out approx_ckpt",
         [*module("approx"), "--checkpoint", "/no/such/path", "--out", "approx_ckpt"]),
        ("prompt", "efficient-attn-generate lm.ckpt --prompt \"\"",
         [*module("generate"), str(lm_ckpt), "--prompt", ""]),
    ]
    rows = []
    for key, shown, argv in cases:
        start = time.monotonic()
        proc = subprocess.run(argv, cwd=work, env=_env(), capture_output=True, text=True, timeout=300)
        seconds = time.monotonic() - start
        lines = _lines(proc.stderr + proc.stdout)
        rows.append({"key": key, "command": shown, "returncode": proc.returncode, "seconds": seconds,
                     "lines": len(lines), "message": (lines[0] if lines else "").replace(str(work), "<work>"),
                     "run_dirs": len(list(work.glob("outputs/*/*"))), "approx_out": (work / "approx_ckpt").exists()})
    return rows


# "before" of the rows above, quoted from where it was measured or reported (never measured by this harness)
ISSUE = "as reported in the issue \"A user's first week\""
DOOR = "results/reliability_door.md, measured at commit be45d3d"
BEFORE = {
    "same_dir": f"both exit 0; results.json and .hydra/ hold only the second run; the checkpoints become last.ckpt "
                f"and last-v1.ckpt ({ISSUE})",
    "live": f"(two runs in one dir) both exit 0; results.json and .hydra/ hold only the second run ({ISSUE})",
    "sigint": f"exit 1 after 2.5 s, nothing printed, no results.json ({ISSUE})",
    "lr": f"42-line traceback ending `ValueError: Invalid learning rate: -1` (torch's AdamW, after the data was "
          f"built), exit 1, 5.4 s ({DOOR})",
    "other_task": "with a translation checkpoint: built the MQAR data, then a 71-line traceback (`RuntimeError: "
                  f"Error(s) in loading state_dict for MQARModule`), exit 1, 142.8 s ({DOOR})",
    "min_lenght": f"7 lines (`Could not override 'task.min_lenght'` ... `+task.min_lenght=10`), exit 1, 0.42 s "
                  f"({DOOR})",
    "lrr": f"7 lines, advises `+optim.lrr=1`, exit 1, 0.42 s ({DOOR})",
    "favr": f"34 lines (`Could not find 'attention/favr'`, all 25 options, the search path), exit 1, 0.28 s ({DOOR})",
    "experment": f"7 lines, advises `+experment=quickstart`, exit 1, 0.40 s ({DOOR})",
    "approx": f"one line, exit 2, 2.9 s, and an empty `approx_ckpt/` left behind ({DOOR})",
    "prompt": "`error: --prompt (0 bytes) plus --max-new-tokens 200 must be 1 to 32 positions (this model's "
              f"model.max_len); shorten one of them`, exit 2, 22.9 s ({DOOR})",
}


def first_week_rows(same: dict[str, Any], stop: dict[str, Any], inputs: list[dict[str, Any]]) -> list[str]:
    """The Markdown rows (what was done | before | after) of the three scenarios above."""
    hide = lambda text: text.replace(stop["work"], "<work>").replace(same["run_dir"], "<run dir>")  # noqa: E731
    first = lambda lines: f"`{hide(lines[0])}`" if lines else "nothing"  # noqa: E731
    said = stop["said"][0] if stop["said"] else ""
    rows = [
        f"| 1. a finished tiny run, then the same command with the same `hydra.run.dir` | {BEFORE['same_dir']} | "
        f"exit {same['returncode']} after {same['seconds']:.1f} s, {len(same['stderr'])} line: "
        f"{first(same['stderr'])}; "
        f"the first run's results.json, .hydra/ ({len(same['hydra_files'])} files) and checkpoints "
        f"{same['checkpoints']} {'intact, byte for byte' if same['intact'] else 'CHANGED'} |",
        f"| 1. while a run trains, a second run with its run dir | {BEFORE['live']} | exit "
        f"{stop['live_returncode']} after {stop['live_seconds']:.1f} s, {len(stop['live_stderr'])} line: "
        f"{first(stop['live_stderr'])}; the first run {'still training' if stop['first_alive'] else 'had ended'}, "
        f"its .hydra/ {'intact' if stop['hydra_intact'] else 'CHANGED'} |",
        f"| 2. Ctrl-C (SIGINT) in the second epoch of `efficient-attn-train` (tiny ListOps, {stop['max_steps']} "
        f"steps, 20 a epoch), then the command it printed | {BEFORE['sigint']} | exit {stop['returncode']} "
        f"{stop['stop_seconds']:.1f} s after the signal, {stop['stderr_lines']} stderr line(s): `{hide(said)}`; "
        f"results.json status `{stop['status']}` at step {stop['interrupted_steps']} (last.ckpt at step "
        f"{stop['saved_step']}); the printed command: exit {stop['resumed_returncode']}, status "
        f"`{stop['final_status']}`, {stop['final_steps']} steps, resumed from "
        f"`{hide(str(stop['resumed_from']))}`, {stop['run_dirs']} run dir |",
    ]
    for r in inputs:
        left = (f"; run dirs left: {r['run_dirs']}" if r["command"].startswith("efficient-attn-train") else
                f"; approx_ckpt/ {'created' if r['approx_out'] else 'not created'}" if r["key"] == "approx" else "")
        lm = " (lm.ckpt: a tiny lm run's last.ckpt, made here)" if "lm.ckpt" in r["command"] else ""
        rows.append(f"| 3. `{r['command']}`{lm} | {BEFORE[r['key']]} | exit {r['returncode']} after "
                    f"{r['seconds']:.2f} s, {r['lines']} line(s): `{r['message'][:300]}`{left} |")
    return rows
