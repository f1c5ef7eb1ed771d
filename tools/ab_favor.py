"""Same-machine A/B of FAVOR+ forward+backward: another checkout's efficient_attn against this one's.

Both modules share one projection and one input; rounds alternate the two (order flipped each round), so
background load hits both alike. Prints min and median seconds and their ratios (``--help``).
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import efficient_attn as new


def load_other(checkout: Path, tmp: Path):
    """``checkout``'s efficient_attn/, copied under ``tmp`` as the package ``efficient_attn_other``."""
    shutil.copytree(checkout / "efficient_attn", tmp / "efficient_attn_other")
    sys.path.insert(0, str(tmp))
    return importlib.import_module("efficient_attn_other")


def measure(pkg_old, length: int, causal: bool, rounds: int) -> dict[str, list[float]]:
    """Seconds of forward+backward per round for the other checkout ("old") and this one ("new")."""
    mods = {name: pkg.create_attention("favor", head_dim=64, num_heads=8, num_features=256)
            for name, pkg in (("old", pkg_old), ("new", new))}
    mods["new"].projection.copy_(mods["old"].projection)
    q, k, v = (torch.randn(1, 8, length, 64, requires_grad=True) for _ in range(3))  # (B, H, L, D)

    def step(module) -> None:
        module(q, k, v, causal=causal).sum().backward()

    times: dict[str, list[float]] = {"old": [], "new": []}
    for name in mods:
        step(mods[name])  # warm-up
    for r in range(rounds):
        for name in ("old", "new") if r % 2 == 0 else ("new", "old"):
            start = time.perf_counter()
            step(mods[name])
            times[name].append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tools.ab_favor", description=__doc__.split("\n\n")[0],
        epilog="example: git worktree add /tmp/base ebf8bf4 && python -m tools.ab_favor /tmp/base 4096 --causal",
    )
    parser.add_argument("other", type=Path, help="a checkout (git worktree) whose efficient_attn/ is the baseline")
    parser.add_argument("length", type=int, help="sequence length L")
    parser.add_argument("--causal", action="store_true", help="causal attention (default: non-causal)")
    parser.add_argument("--rounds", type=int, default=8, help="timed rounds per side (default 8)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="ab_favor-") as tmp:
        times = measure(load_other(args.other, Path(tmp)), args.length, args.causal, args.rounds)
    o, n = min(times["old"]), min(times["new"])
    mo, mn = statistics.median(times["old"]), statistics.median(times["new"])
    print(f"L={args.length} {'causal' if args.causal else 'noncausal'}: min old {o:.4f} new {n:.4f} "
          f"ratio {n / o:.3f} | median old {mo:.4f} new {mn:.4f} ratio {mn / mo:.3f}")


if __name__ == "__main__":
    main()
