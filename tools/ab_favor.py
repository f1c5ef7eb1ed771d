"""Same-machine A/B of FAVOR+ forward+backward: the code before issue 10 against the current code.

    git worktree add /tmp/before ebf8bf4 && mkdir -p /tmp/oldpkg
    cp -r /tmp/before/efficient_attn /tmp/oldpkg/efficient_attn_old
    python tools/ab_favor.py 4096 c 8     # L, c(ausal)|n(on-causal), rounds

Both modules share one projection and one input; rounds alternate old/new (order flipped each
round), so background load hits both alike. Prints min and median seconds and their ratios.
"""

import statistics
import sys
import time

import torch

sys.path.insert(0, "/tmp/oldpkg")
import efficient_attn as new  # noqa: E402
import efficient_attn_old as old  # noqa: E402

torch.set_num_threads(2)
length, causal, rounds = int(sys.argv[1]), sys.argv[2] == "c", int(sys.argv[3])
mods = {name: pkg.create_attention("favor", head_dim=64, num_heads=8, num_features=256)
        for name, pkg in (("old", old), ("new", new))}
mods["new"].projection.copy_(mods["old"].projection)
q, k, v = (torch.randn(1, 8, length, 64, requires_grad=True) for _ in range(3))  # (B, H, L, D)


def step(module):
    module(q, k, v, causal=causal).sum().backward()


times = {"old": [], "new": []}
for name in mods:
    step(mods[name])  # warm-up
for r in range(rounds):
    for name in ("old", "new") if r % 2 == 0 else ("new", "old"):
        start = time.perf_counter()
        step(mods[name])
        times[name].append(time.perf_counter() - start)
o, n = min(times["old"]), min(times["new"])
mo, mn = statistics.median(times["old"]), statistics.median(times["new"])
print(f"L={length} {'causal' if causal else 'noncausal'}: min old {o:.4f} new {n:.4f} ratio {n / o:.3f} | "
      f"median old {mo:.4f} new {mn:.4f} ratio {mn / mo:.3f}")
