"""Old against new code on one machine: run it alternately under two PYTHONPATHs,

    for i in 1 2 3; do PYTHONPATH=OLD python -m tools.ab_step old; PYTHONPATH=. python -m tools.ab_step new; done

Each call prints one JSON line: the median sliding_window forward (no autograd, window 64) at L = 4K and 16K,
causal and not, and the median favor (m = 256) and linear decode step after a 64K prefix; B = 1, H = 8, D = 64,
fp32, 2 threads. Imports only efficient_attn, so any checkout of it can be the old one.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from typing import Callable

import torch

import efficient_attn as ea


def median_ms(call: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``call`` in ms, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def window_forward(gen: torch.Generator) -> dict[str, float]:
    out = {}
    for length in (4096, 16384):
        q, k, v = (torch.randn(1, 8, length, 64, generator=gen) for _ in range(3))  # (B, H, L, D)
        attn = ea.create_attention("sliding_window", head_dim=64, num_heads=8, window=64)
        for causal in (True, False):
            with torch.no_grad():
                ms = median_ms(lambda: attn(q, k, v, causal=causal), 7)  # noqa: B023 (called at once)
            out[f"sliding_window fwd L={length} {'causal' if causal else 'noncausal'} ms"] = ms
    return out


def decode(gen: torch.Generator, length: int = 65536, steps: int = 200) -> dict[str, float]:
    out = {}
    k, v = (torch.randn(1, 8, length, 64, generator=gen) for _ in range(2))  # (B, H, L, D)
    tokens = [torch.randn(3, 1, 8, 1, 64, generator=gen) for _ in range(steps + 1)]  # (q, k, v) of one token
    for name, kwargs in (("favor", {"num_features": 256}), ("linear", {})):
        module = ea.create_attention(name, head_dim=64, num_heads=8, **kwargs).eval()
        with torch.no_grad():
            state = module.prefill(k, v)
            times = []
            for q1, k1, v1 in tokens:
                start = time.perf_counter()
                _, state = module.decode_step(q1, k1, v1, state)
                times.append(time.perf_counter() - start)
        out[f"{name} decode L=64K ms"] = 1e3 * statistics.median(times[1:])  # the first step is the warm-up
    return out


def main() -> None:
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(0)
    out = {**window_forward(gen), **decode(gen)}
    print(json.dumps({"code": sys.argv[1] if len(sys.argv) > 1 else "", **{k: round(x, 4) for k, x in out.items()}}))


if __name__ == "__main__":
    main()
