"""How far `favor`'s decode step can come to `linear`'s in plain PyTorch: one process, interleaved rounds of

- ``module``: ``decode_step`` of each attention after a prefix (what ``efficient-attn-bench --modes decode`` times);
- ``bare``: the tensor operations such a step cannot avoid, in a bare function (no checks, no dtype handling, no
  cache lookups): the features, the state update (a new tensor, as the module's contract asks), the read-out and
  the normalisation; for FAVOR+ the key's log-scale against a fixed running maximum (no rescale);
- ``compiled``: the bare function under ``torch.compile``.

B = 1, H = 8, D = 64, m = 256, fp32. Writes ``floor.csv`` (one row per round and form) and ``floor.md`` (medians
over rounds and the favor/linear ratio of each form) to ``--out``:

    python -m tools.decode_floor --out results/benchmarks/decode/floor
"""

from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

import efficient_attn as ea
from tools.ab_step import median_ms

B, H, D, M = 1, 8, 64, 256


def bare_favor(q, k, v, kv, run_max, w):
    """FAVOR+'s step in its fewest operations: φ(q) = e^{Wq − max}, φ(k) e^{−G} = e^{Wk − ‖k‖²/(2√d) − G}."""
    v1 = F.pad(v, (0, 1), value=1.0)  # (B, H, 1, D+1)
    phi_q = q @ w  # (B, H, 1, M)
    phi_q = (phi_q - phi_q.amax(-1, keepdim=True)).exp()
    a = k @ w - (0.5 * D**-0.5) * torch.linalg.vecdot(k, k)[..., None]  # (B, H, 1, M)
    phi_k = (a - run_max).exp().transpose(-1, -2)  # (B, H, M, 1)
    kv = torch.addcmul(kv, phi_k, v1)  # (B, H, M, D+1)
    out1 = phi_q @ kv  # (B, H, 1, D+1)
    return out1[..., :-1] / out1[..., -1:], kv


def bare_linear(q, k, v, kv):
    """elu+1 linear attention's step in its fewest operations."""
    v1 = F.pad(v, (0, 1), value=1.0)  # (B, H, 1, D+1)
    phi_q, phi_k = F.elu(q) + 1, (F.elu(k) + 1).transpose(-1, -2)  # (B, H, 1, D), (B, H, D, 1)
    kv = torch.addcmul(kv, phi_k, v1)  # (B, H, D, D+1)
    out1 = phi_q @ kv  # (B, H, 1, D+1)
    return out1[..., :-1] / out1[..., -1:], kv


def calls(prefix: int, gen: torch.Generator) -> dict[tuple[str, str], Callable[[], object]]:
    """The six timed calls, keyed by (form, attention), on one token after a ``prefix``-token prefix."""
    k, v = (torch.randn(B, H, prefix, D, generator=gen) for _ in range(2))  # (B, H, L, D)
    q1, k1, v1 = torch.randn(3, B, H, 1, D, generator=gen).unbind(0)  # (B, H, 1, D) each
    favor = ea.create_attention("favor", head_dim=D, num_heads=H, num_features=M).eval()
    linear = ea.create_attention("linear", head_dim=D, num_heads=H).eval()
    s_favor, s_linear = favor.prefill(k, v), linear.prefill(k, v)
    w = favor.projection.T * D**-0.25  # (D, M)
    bare_f = (q1, k1, v1, s_favor["kv"], s_favor["log_scale"], w)
    bare_l = (q1, k1, v1, s_linear["kv"])
    for module, state, bare, args in ((favor, s_favor, bare_favor, bare_f), (linear, s_linear, bare_linear, bare_l)):
        torch.testing.assert_close(bare(*args)[0], module.decode_step(q1, k1, v1, state)[0], rtol=1e-4, atol=1e-5)
    compiled_f, compiled_l = torch.compile(bare_favor, dynamic=False), torch.compile(bare_linear, dynamic=False)
    return {
        ("module", "favor"): lambda: favor.decode_step(q1, k1, v1, s_favor),
        ("module", "linear"): lambda: linear.decode_step(q1, k1, v1, s_linear),
        ("bare", "favor"): lambda: bare_favor(*bare_f),
        ("bare", "linear"): lambda: bare_linear(*bare_l),
        ("compiled", "favor"): lambda: compiled_f(*bare_f),
        ("compiled", "linear"): lambda: compiled_l(*bare_l),
    }


def summary(rows: list[dict], threads: int, prefix: int) -> str:
    """Medians over rounds per (form, attention) and favor/linear per form, as markdown."""
    med = {}
    for form in ("module", "bare", "compiled"):
        for name in ("favor", "linear"):
            med[form, name] = statistics.median(r["us"] for r in rows if r["form"] == form and r["attention"] == name)
    lines = [
        "# FAVOR+ against elu+1 decode step: module, bare operations, compiled",
        "",
        f"- {torch.__version__}, {threads} threads, B = {B}, H = {H}, D = {D}, m = {M}, fp32, {prefix}-token prefix;",
        f"  medians over {len({r['round'] for r in rows})} interleaved rounds (each a median of timed calls)",
        "",
        "| form | favor (µs) | linear (µs) | favor / linear |",
        "|---|---|---|---|",
    ]
    for form in ("module", "bare", "compiled"):
        f, lin = med[form, "favor"], med[form, "linear"]
        lines.append(f"| {form} | {f:.1f} | {lin:.1f} | {f / lin:.2f}× |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prefix", type=int, default=4096, help="prefix length (the state's size does not depend on it)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=400)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with torch.no_grad():
        timed = calls(args.prefix, torch.Generator().manual_seed(0))
        for r in range(args.rounds):
            for (form, name), call in timed.items():
                us = 1e3 * median_ms(call, args.repeats, warmup=50)
                rows.append({"round": r, "form": form, "attention": name, "us": us})
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "floor.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    text = summary(rows, args.threads, args.prefix)
    (args.out / "floor.md").write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
