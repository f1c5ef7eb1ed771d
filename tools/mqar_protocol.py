"""The MQAR protocol as a resumable queue: per (attention, cell, width), a learning-rate search on validation,
then more seeds at the chosen rate, then more again where the seeds disagree about success.

    python -m tools.mqar_protocol SWEEP_DIR --items softmax:L64_kv8:64 deltanet+conv4:L64_kv8:64 [--workers 2]
    python -m tools.mqar_protocol SWEEP_DIR --items ... --status   # each item's stage and runs done; launches nothing

An item is ``ATTENTION[+convK]:CELL:D_MODEL``. Stages, each one ``efficient-attn-train -m experiment=mqar/grid``
call into SWEEP_DIR (``ckpt_path=last``: finished jobs are skipped, interrupted ones resume):

1. search: every ``--lrs`` value × ``--search-seeds``; while the best rate is the grid's smallest or largest and
   its mean validation accuracy is below 1, half a decade more past that end (3e-2 after 1e-2), ``--extend``
   rates at most;
2. confirm: the learning rate with the best mean ``val_best`` over the search seeds, seeds up to ``--seeds``;
3. widen: where the confirmed runs disagree about success (``val_best >= --success``), seeds up to ``--more-seeds``.

A run that failed on a non-finite loss is not launched again: with the same seed it diverges at the same step.
Workers take items in order (one job each, one thread), so every item finishes whole before the queue moves on.
Selection reads validation only; the report (``--tune config.optim.lr``) compares rates on the seeds every rate has.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

from efficient_attn_tasks.run.record import RunRecord


def parse_item(text: str) -> tuple[str, int, str, int]:
    """``deltanet+conv4:L64_kv8:64`` → ("deltanet", 4, "L64_kv8", 64)."""
    attention, cell, width = text.split(":")
    name, _, conv = attention.partition("+conv")
    return name, int(conv or 0), cell, int(width)


def item_overrides(name: str, conv: int, cell: str, width: int) -> list[str]:
    out = [f"attention={name}", f"mqar_cell={cell}", f"model.d_model={width}"]
    return out + ([f"attention.layer.short_conv={conv}"] if conv else [])


def train(sweep: Path, overrides: list[str], lrs: list[float], seeds: list[int], extra: list[str]) -> None:
    cmd = ["efficient-attn-train", "-m", "experiment=mqar/grid", f"hydra.sweep.dir={sweep}", "ckpt_path=last",
           "hydra.launcher.n_jobs=1", *overrides, *extra, "optim.lr=" + ",".join(map(str, lrs)),
           "seed=" + ",".join(map(str, seeds))]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=False, cwd=sweep)


def same(a: float, b: float) -> bool:
    """Two learning rates are the same rate (a record's float against the grid's)."""
    return abs(a - b) < 1e-12


def diverged(r: RunRecord) -> bool:
    """A run that failed on a non-finite loss: with the same seed it diverges at the same step."""
    return r.status == "failed" and r.error is not None and r.error.type == "FloatingPointError"


def launches(runs: list[RunRecord], lrs: list[float], seeds: list[int]) -> list[tuple[list[float], list[int]]]:
    """The (rates, seeds) grids to launch: every rate × seed except those whose run diverged (a failed record
    whose error is a FloatingPointError); rates that keep the same seeds share one launch."""
    skip = {(r.config["optim"]["lr"], r.seed) for r in runs if diverged(r)}
    grids: dict[tuple[int, ...], list[float]] = {}
    for lr in lrs:
        kept = tuple(s for s in seeds if not any(same(lr, d) and s == ds for d, ds in skip))
        if kept:
            grids.setdefault(kept, []).append(lr)
    return [(rates, list(kept)) for kept, rates in grids.items()]


def settled(runs: list[RunRecord]) -> set[tuple[float, int]]:
    """(lr, seed) of the runs that need no launch: finished, or diverged (a FloatingPointError)."""
    return {(r.config["optim"]["lr"], r.seed) for r in runs if r.status == "ok" or diverged(r)}


def widens(chosen: list[RunRecord], args: argparse.Namespace) -> bool:
    """Whether an item goes on to ``--more-seeds``: its finished runs at the chosen rate with seeds below ``--seeds``
    disagree about success."""
    wins = {r.metrics.val_best >= args.success for r in chosen if r.seed < args.seeds}
    return len(wins) > 1 and args.more_seeds > args.seeds


def progress(runs: list[RunRecord], args: argparse.Namespace) -> str:
    """The item's first unfinished stage and its runs done, or ``done`` with the chosen rate and its successes."""
    have = settled(runs)

    def count(lrs: list[float], seeds: list[int]) -> tuple[int, int]:
        return sum(any(same(lr, h) and s == hs for h, hs in have) for lr in lrs for s in seeds), len(lrs) * len(seeds)

    done, need = count(args.lrs, args.search_seeds)
    if done < need:
        return f"search {done}/{need}"
    lrs = list(args.lrs)
    while (more := extension(runs, lrs, args)) is not None:
        lrs.append(more)
        done, need = count([more], args.search_seeds)
        if done < need:
            return f"extend to lr {more:g} {done}/{need}"
    lr = best_lr(runs, lrs, args.search_seeds)
    chosen = [r for r in runs if r.status == "ok" and same(r.config["optim"]["lr"], lr)]
    stages = [("confirm", args.seeds)]
    if widens(chosen, args):
        stages.append(("widen", args.more_seeds))
    for name, n in stages:
        done, need = count([lr], list(range(n)))
        if done < need:
            return f"{name} at lr {lr:g} {done}/{need}"
    wins = sum(r.metrics.val_best >= args.success for r in chosen)
    return f"done at lr {lr:g}: {wins}/{len(chosen)} with val >= {args.success:g}"


def records(sweep: Path, name: str, conv: int, cell_len: tuple[int, int], width: int) -> list[RunRecord]:
    """The finished (ok) and failed runs of one item in the sweep dir."""
    found = []
    for path in sweep.glob("*/results.json"):
        r = RunRecord.read(path)
        c = r.config
        if r.status not in ("ok", "failed") or c["attention"].get("config") != name:
            continue
        if ((c["task"]["seq_len"], c["task"]["num_kv_pairs"]) == cell_len and c["model"]["d_model"] == width
                and int((c["attention"].get("layer") or {}).get("short_conv") or 0) == conv):
            found.append(r)
    return found


def mean_scores(runs: list[RunRecord], lrs: list[float], seeds: list[int]) -> dict[float, float]:
    """Each rate's mean val_best over the search seeds, ascending by rate; a failed (diverged) run scores the
    worst."""
    def score(r: RunRecord) -> float:
        return r.metrics.val_best if r.status == "ok" else -math.inf

    scores = {lr: [score(r) for r in runs if same(r.config["optim"]["lr"], lr) and r.seed in seeds]
              for lr in sorted(lrs)}
    return {lr: statistics.mean(v) for lr, v in scores.items() if v}


def best_lr(runs: list[RunRecord], lrs: list[float], seeds: list[int]) -> float | None:
    """The rate with the best mean val_best over the search seeds (ties to the smaller rate)."""
    scored = mean_scores(runs, lrs, seeds)
    return max(scored, key=scored.get) if scored else None


def next_rate(lr: float, step: int) -> float:
    """Half a decade up (``step`` 1) or down (-1) on the 1-3-10 grid: 1e-2 → 3e-2, 1e-4 → 3e-5."""
    return float(f"{10 ** ((round(2 * math.log10(lr)) + step) / 2):.0e}")


def extension(runs: list[RunRecord], lrs: list[float], args: argparse.Namespace) -> float | None:
    """The rate the search adds next: half a decade past the grid's end when the best rate is that end and its
    mean validation accuracy is below 1 (a rate outside could beat it), ``--extend`` rates past ``--lrs`` at
    most; None when the best rate is inside the grid (a diverged rate counts as tried), at ceiling, or the
    extensions are spent."""
    scored = mean_scores(runs, lrs, args.search_seeds)
    if not scored or len(lrs) - len(args.lrs) >= args.extend:
        return None
    best = max(scored, key=scored.get)
    if scored[best] >= 1:
        return None
    if same(best, max(lrs)):
        return next_rate(best, 1)
    return next_rate(best, -1) if same(best, min(lrs)) else None


def cell_of(cell: str) -> tuple[int, int]:
    """(seq_len, num_kv_pairs) of configs/mqar_cell/<cell>.yaml."""
    c = OmegaConf.load(Path(__file__).resolve().parents[1] / "configs" / "mqar_cell" / f"{cell}.yaml")
    return int(c.seq_len), int(c.num_kv_pairs)


def run_item(sweep: Path, item: str, args: argparse.Namespace) -> None:
    name, conv, cell, width = parse_item(item)
    overrides = item_overrides(name, conv, cell, width)
    cell_len = cell_of(cell)

    def found() -> list[RunRecord]:
        return records(sweep, name, conv, cell_len, width)

    def stage(lrs: list[float], seeds: list[int]) -> None:
        for rates, kept in launches(found(), lrs, seeds):
            train(sweep, overrides, rates, kept, args.extra)

    stage(args.lrs, args.search_seeds)
    lrs = list(args.lrs)
    while (more := extension(found(), lrs, args)) is not None:
        lrs.append(more)
        stage([more], args.search_seeds)
    lr = best_lr(found(), lrs, args.search_seeds)
    if lr is None:
        print(f"{item}: no finished search run", flush=True)
        return
    stage([lr], list(range(args.seeds)))
    chosen = [r for r in found() if r.status == "ok" and same(r.config["optim"]["lr"], lr)]
    if widens(chosen, args):
        stage([lr], list(range(args.more_seeds)))


def claim(sweep: Path, item: str) -> bool:
    try:
        (sweep / ".claims" / item.replace(":", "_")).mkdir(parents=True)
        return True
    except FileExistsError:
        return False


def worker(sweep: Path, items: list[str], args: argparse.Namespace) -> None:
    for item in items:
        if claim(sweep, item):
            run_item(sweep, item, args)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", type=Path)
    p.add_argument("--items", nargs="+", required=True)
    p.add_argument("--lrs", type=lambda s: [float(x) for x in s.split(",")], default=[1e-4, 3e-4, 1e-3, 3e-3, 1e-2])
    p.add_argument("--extend", type=int, default=2, help="rates the search may add past an end of --lrs")
    p.add_argument("--search-seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--more-seeds", type=int, default=10)
    p.add_argument("--success", type=float, default=0.9)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--extra", nargs="*", default=[], help="more overrides for every job, e.g. trainer.max_steps=5")
    p.add_argument("--status", action="store_true", help="print each item's stage and runs done; launch nothing")
    args = p.parse_args(argv)
    sweep = args.sweep.resolve()
    if args.status:
        for item in args.items:
            name, conv, cell, width = parse_item(item)
            print(f"{item}: {progress(records(sweep, name, conv, cell_of(cell), width), args)}")
        return
    (sweep / ".claims").mkdir(parents=True, exist_ok=True)
    if os.environ.get("MQAR_PROTOCOL_WORKER"):
        worker(sweep, args.items, args)
        return
    for claimed in (sweep / ".claims").iterdir():  # a restart re-runs every unfinished item (finished jobs skip)
        claimed.rmdir()
    env = dict(os.environ, MQAR_PROTOCOL_WORKER="1")
    procs = [subprocess.Popen([sys.executable, "-m", "tools.mqar_protocol", *sys.argv[1:]], env=env)
             for _ in range(args.workers)]
    sys.exit(max(p.wait() for p in procs))


if __name__ == "__main__":
    main()
