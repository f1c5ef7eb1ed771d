"""The quickstart on a busy machine: each attention's quickstart training timed idle and beside 1, 2, ...
CPU-bound processes (``while True: pass``), under several thread settings; the figure is each time's ratio
to the same setting idle.

    python -m efficient_attn_tasks.bench.contention --out results/benchmarks/contention

Settings: ``default`` (nothing set: the run picks its threads from the cores other processes leave free, and
the package's waiting policy applies), ``before`` (threads = every core and libgomp's own spin-then-sleep
wait, ``GOMP_SPINCOUNT=300000``: what a run did before either default), ``passive`` (every core, threads sleep
at once when they wait: ``OMP_WAIT_POLICY=PASSIVE``) and ``threads1`` (``threads=1``). Each job is a fresh
``efficient-attn-train experiment=quickstart attention=A`` process; a job over ``--timeout`` is stopped and
its time is a lower bound. ``--late S`` starts the CPU-bound processes S seconds into each job instead: load
that arrives after a run chose its threads. Writes contention.csv, contention.png and summary.md into ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from efficient_attn_tasks.run.threads import busy_cores

QUICKSTART = ("softmax", "favor_plus", "additive", "bilinear")
WAIT_ENV = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
SETTINGS: dict[str, tuple[dict[str, str], str | None]] = {  # name -> (environment, threads= override)
    "default": ({}, None),
    "before": ({"GOMP_SPINCOUNT": "300000"}, "cores"),
    "passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, "cores"),
    "threads1": ({}, "1"),
}
FIELDS = ("setting", "load", "attention", "repeat", "status", "wall_s", "fit_s", "threads", "test_bleu",
          "busy_before")


def spinners(n: int) -> list[subprocess.Popen]:
    """``n`` CPU-bound processes, one core each."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def job_env(setting: str, work: Path) -> dict[str, str]:
    """The environment of one job: this one's without thread or wait settings, W&B off, plus the setting's."""
    env = {k: v for k, v in os.environ.items() if k not in WAIT_ENV}
    env.update(WANDB_MODE="disabled", WANDB_DIR=str(work), WANDB_CACHE_DIR=str(work), WANDB_CONFIG_DIR=str(work))
    return {**env, **SETTINGS[setting][0]}


def run_job(setting: str, attention: str, args: argparse.Namespace, load: int, work: Path) -> dict[str, Any]:
    """One quickstart training beside ``load`` spinners (started before it, or ``args.late`` seconds after it
    starts): wall seconds, status, and what its run record says."""
    threads = SETTINGS[setting][1]
    extra = [f"threads={os.cpu_count() if threads == 'cores' else threads}"] if threads else []
    extra += [f"trainer.max_epochs={args.epochs}"] if args.epochs else []
    run_dir = work / "run"
    cmd = [sys.executable, "-m", "efficient_attn_tasks.commands.train", "experiment=quickstart",
           f"attention={attention}", f"hydra.run.dir={run_dir}", *extra]
    load_procs = [] if args.late else spinners(load)
    if load_procs:
        time.sleep(0.5)  # the spinners are running before the job starts
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=job_env(setting, work), cwd=work, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        if args.late:
            try:
                proc.wait(args.late)
            except subprocess.TimeoutExpired:
                load_procs = spinners(load)
        try:
            _, stderr = proc.communicate(timeout=max(1.0, args.timeout - (time.perf_counter() - start)))
            status = "ok" if proc.returncode == 0 else f"rc {proc.returncode}"
        except subprocess.TimeoutExpired:
            proc.kill()
            _, stderr = proc.communicate()
            status = "timeout"
        wall = time.perf_counter() - start
    finally:
        for p in load_procs:
            p.kill()
            p.wait()
    row: dict[str, Any] = {"status": status, "wall_s": round(wall, 2)}
    if status == "ok":
        record = json.loads((run_dir / "results.json").read_text())
        row.update(fit_s=round(record["fit_time_s"], 2), threads=record["threads"],
                   test_bleu=round(record["metrics"]["test"]["test/bleu"], 2))
    elif status != "timeout":
        sys.stderr.write(stderr[-2000:])
    return row


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every (repeat, load, setting, attention), loads interleaved so drift touches every setting alike."""
    rows = []
    for repeat in range(args.repeats):
        for load in args.loads:
            for setting in args.settings:
                for attention in args.attentions:
                    busy = busy_cores(0.5)
                    with tempfile.TemporaryDirectory() as tmp:
                        row = run_job(setting, attention, args, load, Path(tmp))
                    row.update(setting=setting, load=load, attention=attention, repeat=repeat,
                               busy_before=None if busy is None else round(busy, 2))
                    print(" ".join(f"{k}={row.get(k)}" for k in FIELDS), flush=True)
                    rows.append(row)
    return rows


def median_wall(rows: list[dict[str, Any]], setting: str, load: int, attention: str | None = None) -> float:
    """Median over repeats of one job's wall time, or of the quickstart's (every attention summed)."""
    per_repeat: dict[int, float] = {}
    for r in rows:
        if r["setting"] == setting and r["load"] == load and attention in (None, r["attention"]):
            per_repeat[r["repeat"]] = per_repeat.get(r["repeat"], 0.0) + float(r["wall_s"])
    return statistics.median(per_repeat.values())


def any_timeout(rows: list[dict[str, Any]], setting: str, load: int, attention: str | None = None) -> bool:
    return any(r["status"] == "timeout" for r in rows
               if r["setting"] == setting and r["load"] == load and attention in (None, r["attention"]))


def summary(rows: list[dict[str, Any]], settings: list[str], loads: list[int], attentions: list[str],
            machine: str, command: str, late: float = 0.0) -> str:
    """Per setting and load: the quickstart's seconds and its ratio to the same setting idle; then per job."""
    when = f"the processes start {late:g} s into each job" if late else "the processes start before each job"
    out = ["# The quickstart beside CPU-bound processes", "", f"- machine: {machine}", f"- command: `{command}`",
           f"- jobs: {', '.join(attentions)}; {when}; ratio = seconds / the same setting's idle seconds (median over "
           "repeats); `>` marks a job stopped at the timeout (a lower bound)", "",
           "| setting | " + " | ".join(f"{n} busy: s (× idle)" for n in loads) + " |",
           "|---|" + "---|" * len(loads)]

    def cell(setting: str, load: int, attention: str | None = None) -> str:
        wall = median_wall(rows, setting, load, attention)
        idle = median_wall(rows, setting, loads[0], attention)
        more = ">" if any_timeout(rows, setting, load, attention) else ""
        return f"{more}{wall:.1f} ({more}{wall / idle:.2f}×)"

    for setting in settings:
        out.append(f"| {setting} | " + " | ".join(cell(setting, n) for n in loads) + " |")
    out += ["", "Per job:", "", "| setting | attention | threads | " + " | ".join(f"{n} busy" for n in loads) + " |",
            "|---|---|---|" + "---|" * len(loads)]
    for setting in settings:
        for attention in attentions:
            threads = sorted({str(r.get("threads")) for r in rows if r["setting"] == setting
                              and r["attention"] == attention and r.get("threads")}, key=str)
            out.append(f"| {setting} | {attention} | {'/'.join(threads) or '-'} | "
                       + " | ".join(cell(setting, n, attention) for n in loads) + " |")
    return "\n".join(out) + "\n"


def plot(rows: list[dict[str, Any]], settings: list[str], loads: list[int], path: Path) -> Path:
    from efficient_attn_tasks.plots import Line, Panel, seed_bands

    ticks = (list(loads), [str(n) for n in loads])
    ratio = Panel(title="quickstart time / its idle time", xlabel="CPU-bound processes beside it",
                  ylabel="× idle", yscale="log", ticks=ticks)
    wall = Panel(title="quickstart time", xlabel="CPU-bound processes beside it", ylabel="seconds", yscale="log",
                 ticks=ticks)
    for i, setting in enumerate(settings):
        walls = [median_wall(rows, setting, n) for n in loads]
        ratio.lines.append(Line(setting, loads, [w / walls[0] for w in walls], index=i, reference=setting == "default"))
        wall.lines.append(Line(setting, loads, walls, index=i, reference=setting == "default"))
    return seed_bands([ratio, wall], path)


def write(rows: list[dict[str, Any]], args: argparse.Namespace, command: str) -> list[Path]:
    from efficient_attn_tasks.bench.report import machine_info

    args.out.mkdir(parents=True, exist_ok=True)
    csv_path = args.out / "contention.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows({k: r.get(k) for k in FIELDS} for r in rows)
    machine = machine_info("cpu", os.cpu_count() or 1)[0].rsplit(",", 1)[0]  # threads differ per setting
    md = args.out / "summary.md"
    md.write_text(summary(rows, args.settings, args.loads, args.attentions, machine, command, args.late))
    return [csv_path, plot(rows, args.settings, args.loads, args.out / "contention.png"), md]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m efficient_attn_tasks.bench.contention",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--attentions", default=",".join(QUICKSTART), help="comma-separated attention configs")
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated from {', '.join(SETTINGS)}")
    p.add_argument("--loads", type=int, nargs="+", default=[0, 1, 2], help="CPU-bound processes beside each job")
    p.add_argument("--repeats", type=int, default=1, help="times every job runs")
    p.add_argument("--epochs", type=int, help="trainer.max_epochs (default: the quickstart's)")
    p.add_argument("--late", type=float, default=0.0,
                   help="start the CPU-bound processes this many seconds after each job (0: before it)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds after which a job is stopped")
    p.add_argument("--out", type=Path, default=Path("contention_out"), help="output folder")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    args.attentions = args.attentions.split(",")
    args.settings = args.settings.split(",")
    unknown = sorted(set(args.settings) - set(SETTINGS))
    if unknown or not args.loads or args.loads[0] != 0:
        parser().error(f"unknown settings {unknown}" if unknown else "--loads must start with 0 (the idle time)")
    command = "python -m efficient_attn_tasks.bench.contention " + " ".join(sys.argv[1:] if argv is None else argv)
    rows = measure(args)
    for path in write(rows, args, command):
        print(path)


if __name__ == "__main__":
    main()
