"""The benchmark behind ``efficient-attn-bench``: forward+backward time and peak memory of every attention against L.

Owns the kernel modes (causal, noncausal: ``attn(q, k, v).mean().backward()`` on random (B, H, L, D) inputs)
and their series (a failure skips the larger L; ``--budget`` bounds the run), the matmul peak, the command's
run over every mode, and the ``--worker`` entry that measures one point of any mode in its own subprocess.
The attentions compared with the compiled FlexAttention baselines (:mod:`~efficient_attn_tasks.bench.flex`)
are also timed forward alone. The point machinery is :mod:`~efficient_attn_tasks.bench.points`; the other modes are
:mod:`~efficient_attn_tasks.bench.decode` and :mod:`~efficient_attn_tasks.bench.train`; the report is
:mod:`~efficient_attn_tasks.bench.report`.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import re
import resource
import statistics
import sys
import time
from typing import Any, Callable, Iterator

from efficient_attn_tasks.bench import decode as bench_decode
from efficient_attn_tasks.bench import train as bench_train
from efficient_attn_tasks.bench import train_report
from efficient_attn_tasks.bench.flex import (
    FLEX_BASELINES,
    FORWARD_ONLY,
    FORWARD_TIMED,
    build_flex,
    flex_unavailable,
    forward_only,
)
from efficient_attn_tasks.bench.points import (
    BASELINES,
    DTYPES,
    MARK,
    MIB,
    attention_module,
    by_length,
    cap_address_space,
    estimate_bytes,
    next_stop,
    not_applicable,
    not_run,
    rss_mib,
    run_subprocess,
    time_left,
)
from efficient_attn_tasks.bench.report import machine_info, plot, summary
from efficient_attn_tasks.bench.sdpa import SDPA_BACKENDS, sdpa_backend, sdpa_unavailable
from efficient_attn_tasks.commands.cli import wrote

FEATURE_ATTENTIONS = {"favor", "performer_pytorch"}  # FLOPs 3 × 8·L·m·d per head (fwd 8Lmd, bwd ≈ 2× fwd)
QUADRATIC_ATTENTIONS = {"softmax", "dot", "bilinear", "sdpa", "flex"}  # FLOPs 3 × 4·L²·d per head, noncausal only
SLOW_STEP_S = 20.0  # predicted seconds per step above which a point is timed once
FIELDS = ["attention", "mode", "L", "batch", "heads", "head_dim", "num_features", "dtype", "device",
          "threads", "repeats", "status", "time_s", "time_min_s", "forward_s", "peak_rss_mib", "base_rss_mib",
          "peak_cuda_mib", "gflops", "frac_of_matmul", "tokens_per_s", "prefill_s", "state_mib", "torch_version",
          "message"]


# ---------------------------------------------------------------- worker side (one point per process)

def _build(spec: dict[str, Any]) -> Callable:
    """The callable f(q, k, v) timed for ``spec['attention']``."""
    import torch.nn.functional as F

    name, causal = spec["attention"], spec["mode"] == "causal"
    if name in SDPA_BACKENDS:
        def sdpa(q: Any, k: Any, v: Any) -> Any:
            with sdpa_backend(name):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        return sdpa
    if name in FLEX_BASELINES:
        return build_flex(spec)
    if name == "performer_pytorch":
        from performer_pytorch import FastAttention

        module = FastAttention(dim_heads=spec["head_dim"], nb_features=spec["num_features"], causal=causal)
        return module.to(spec["device"])
    module = attention_module(spec)
    return lambda q, k, v: module(q, k, v, causal=causal)


def _timed(call: Callable[[], None], repeats: int) -> list[float]:
    """Seconds of ``repeats`` calls of ``call``, after one untimed warm-up call (where torch.compile compiles)."""
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def run_point(spec: dict[str, Any]) -> dict[str, Any]:
    """Time one (attention, mode, L) point in this process; returns the measured fields: forward+backward
    (``time_s``), and for :data:`FORWARD_TIMED` the forward alone without autograd (``forward_s``);
    FlexAttention on CPU only the latter (status ``forward only``)."""
    import torch

    torch.set_num_threads(spec["threads"])
    device, cuda = torch.device(spec["device"]), spec["device"].startswith("cuda")
    dtype = getattr(torch, DTYPES[spec["dtype"]])
    fn = _build(spec)
    params = list(fn.parameters()) if isinstance(fn, torch.nn.Module) else []
    shape = (spec["batch"], spec["heads"], spec["L"], spec["head_dim"])
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(shape, generator=gen, device=device, dtype=dtype).requires_grad_() for _ in range(3))
    leaves = [q, k, v, *params]
    inputs = [t.detach() for t in (q, k, v)]  # the forward alone: no input requires grad

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def step() -> None:
        for t in leaves:
            t.grad = None
        fn(q, k, v).mean().backward()
        sync()

    def forward() -> None:
        with torch.no_grad():
            fn(*inputs)
        sync()

    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base_rss = rss_mib()
    if forward_only(spec["attention"], spec["device"]):
        result = {"status": FORWARD_ONLY, "message": "FlexAttention has no backward on CPU: forward timed alone"}
    else:
        times = _timed(step, spec["repeats"])
        result = {"status": "ok", "time_s": statistics.median(times), "time_min_s": min(times)}
    if spec["attention"] in FORWARD_TIMED:
        result["forward_s"] = statistics.median(_timed(forward, spec["repeats"]))
    return result | {
        "base_rss_mib": base_rss, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_cuda_mib": torch.cuda.max_memory_allocated() / MIB if cuda else None,
    }


def run_matmul(spec: dict[str, Any]) -> dict[str, Any]:
    """Best-of-repeats GFLOP/s of an n×n @ n×n matmul (2n³ FLOPs)."""
    import torch

    torch.set_num_threads(spec["threads"])
    n, cuda = spec["L"], spec["device"].startswith("cuda")
    dtype = getattr(torch, DTYPES[spec["dtype"]])
    a, b = (torch.randn(n, n, device=spec["device"], dtype=dtype) for _ in range(2))
    times = []
    for _ in range(spec["repeats"] + 1):  # the first is the warm-up
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    best = min(times[1:])
    return {"status": "ok", "time_s": statistics.median(times[1:]), "time_min_s": best,
            "gflops": 2 * n**3 / best / 1e9, "frac_of_matmul": 1.0}


def worker_main(spec_json: str) -> None:
    """Entry of the subprocess: run the point, print one ``BENCH_RESULT {json}`` line."""
    spec = json.loads(spec_json)
    try:
        if spec.get("imports"):
            from efficient_attn.registry import import_attentions

            import_attentions(spec["imports"])  # the user's own attentions (--imports)
        if not spec["device"].startswith("cuda"):
            cap_address_space()
        if spec["attention"] == "matmul":
            result = run_matmul(spec)
        elif spec["mode"] == "train":
            result = bench_train.run_train_point(spec)
        else:
            result = (bench_decode.run_decode if spec["mode"] == "decode" else run_point)(spec)
    except Exception as exc:  # recorded, not raised: one failure must not end the benchmark
        text = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:300]
        oom = isinstance(exc, MemoryError) or re.search(r"out of memory|can't allocate", str(exc), re.I)
        result = {"status": "oom" if oom else "error", "message": text}
    print(MARK + json.dumps(result), flush=True)


# ---------------------------------------------------------------- parent side

def flops(name: str, causal: bool, length: int, cfg: dict[str, Any]) -> float | None:
    """Nominal forward+backward FLOPs (backward ≈ 2× forward, hence the factor 3), all heads."""
    heads = cfg["batch"] * cfg["heads"]
    if name in FEATURE_ATTENTIONS:  # features of q and k (4Lmd), φ(k)ᵀv (2Lmd), φ(q)·kv (2Lmd)
        return 3 * 8 * length * cfg["num_features"] * cfg["head_dim"] * heads
    if name in QUADRATIC_ATTENTIONS and not causal:  # q kᵀ (2L²d) and P v (2L²d)
        return 3 * 4 * length**2 * cfg["head_dim"] * heads
    return None


def make_row(name: str, mode: str, length: int, cfg: dict[str, Any], result: dict[str, Any],
             peak_gflops: float | None) -> dict[str, Any]:
    """One CSV row: configuration, the worker's result, and derived GFLOP/s."""
    row = {key: cfg.get(key) for key in FIELDS} | {"attention": name, "mode": mode, "L": length}
    row["num_features"] = cfg["num_features"] if name in FEATURE_ATTENTIONS else None
    row.update({key: result.get(key) for key in FIELDS if key in result})
    count = flops(name, mode == "causal", length, cfg) if mode != "decode" else None
    if row["status"] == "ok" and count and row["time_s"]:
        row["gflops"] = count / row["time_s"] / 1e9
        row["frac_of_matmul"] = row["gflops"] / peak_gflops if peak_gflops else None
    return row


def _shown(result: dict[str, Any]) -> str:
    """A point's times (or why it has none) for the progress line."""
    if result["status"] not in ("ok", FORWARD_ONLY):
        return result.get("message", "")
    times = [f"{result['time_s']:.4f} s"] if result.get("time_s") is not None else []
    times += [f"forward {result['forward_s']:.4f} s"] if result.get("forward_s") is not None else []
    return ", ".join(times)


def run_series(name: str, mode: str, cfg: dict[str, Any], peak: float | None) -> Iterator[dict[str, Any]]:
    """The rows of one (attention, mode), one L per ``next`` (:func:`by_length` interleaves the series).
    After a failure the larger L are skipped; a point whose step is predicted (quadratically from the
    last one) to overrun the time limit is skipped too, and one predicted to take over ``SLOW_STEP_S``
    per step is timed once instead of ``repeats`` times. A mode the variant cannot run is ``n/a`` at
    every L; once the run's ``--budget`` is spent, ``skipped``."""
    stop, last = None, None
    reason = (flex_unavailable(name, mode) if name in FLEX_BASELINES else not_applicable(name, mode)) \
        or sdpa_unavailable(name, cfg["device"], cfg["dtype"])
    for length in cfg["lengths"]:
        estimate = estimate_bytes(name, length, cfg) if mode != "decode" else None
        step = last[1] * (length / last[0]) ** 2 if last else 0.0  # predicted seconds per step
        repeats = cfg["repeats"] if step < SLOW_STEP_S else 1
        limit = time_left(cfg)
        result = not_run(reason, stop, limit, cfg["device"], estimate, step * (repeats + 1),
                         f"predicted {step:.0f} s per step > time limit")
        if result is None:
            spec = {key: cfg[key] for key in ("batch", "heads", "head_dim", "num_features", "dtype",
                                              "device", "threads", "decode_steps")}
            spec |= {"attention": name, "mode": mode, "L": length, "repeats": repeats,
                     "imports": cfg.get("imports", [])}
            result = run_subprocess(spec, limit) | {"repeats": repeats}
        if result["status"] in ("ok", FORWARD_ONLY):
            last = (length, result.get("time_s") or result["forward_s"])
        stop = next_stop(result, stop, length)
        line = f"{name:<18} {mode:<9} L={length:<6} {result['status']:<8} {_shown(result)}"
        print(f"  {line}", file=sys.stderr, flush=True)
        yield make_row(name, mode, length, cfg, result, peak)


def run(args: argparse.Namespace) -> None:
    """The benchmark ``efficient-attn-bench``'s options ask for (efficient_attn_tasks/commands/bench.py), into
    ``args.out``; ``--summarize``: the train mode's files redrawn from its CSV, nothing measured."""
    if importlib.util.find_spec("matplotlib") is None:  # before minutes of timing, not at the plot
        raise SystemExit('efficient-attn-bench draws its PNGs with matplotlib: pip install "efficient-attn[bench]"')
    if args.summarize:
        return wrote(*train_report.rebuild(args.out), file=sys.stderr)
    import torch

    import efficient_attn as ea

    ea.import_attentions(args.imports)
    names = args.attentions.split(",") if args.attentions else ea.list_attentions()
    for name in names:
        if name not in BASELINES and name not in SDPA_BACKENDS and name not in FLEX_BASELINES:
            ea.get_attention_class(name)  # unknown names fail here, with the registered ones listed
    if args.baselines:
        if importlib.util.find_spec("performer_pytorch") is None:
            print("note: performer_pytorch not installed (pip install -e '.[bench]'); baseline skipped")
        names += [b for b in BASELINES if b not in names and (b != "performer_pytorch" or importlib.util.find_spec(b))]
        names += [b for b, mirrored in FLEX_BASELINES.items() if mirrored in names and b not in names]
    deadline = time.monotonic() + args.budget if args.budget is not None else None
    cfg = vars(args) | {"torch_version": torch.__version__, "deadline": deadline}
    machine, slug = machine_info(args.device, args.threads)
    modes = args.modes.split(",")
    kernel_modes = [m for m in modes if m != "train"]
    if kernel_modes:
        run_kernel_modes(names, kernel_modes, cfg, machine, slug)
    if "train" in modes:
        csv_path, png, md = (args.out / f"{stem}_{slug}{ext}" for stem, ext in
                             (("train", ".csv"), ("train", ".png"), ("train_summary", ".md")))
        rows = bench_train.run(names, cfg, machine, csv_path)
        wrote(csv_path, *train_report.report(rows, cfg, machine, png, md), file=sys.stderr)


def run_kernel_modes(names: list[str], modes: list[str], cfg: dict[str, Any], machine: str, slug: str) -> None:
    """The matmul peak, then every (attention, mode) series, one L at a time (:func:`by_length`); writes the
    CSV, plot and summary into ``--out``."""
    out = cfg["out"]
    spec = {k: cfg[k] for k in ("dtype", "device", "threads", "repeats")}
    spec |= {"attention": "matmul", "L": cfg["matmul_size"]}
    limit = time_left(cfg)
    spent = {"status": "skipped", "message": "the run's --budget is spent"}
    matmul = run_subprocess(spec, limit) if limit > 0 else spent
    peak = matmul.get("gflops")
    shown = f"{peak:.1f} GFLOP/s" if peak else matmul.get("message", "")
    print(f"matmul {cfg['matmul_size']}²: {shown}", file=sys.stderr)
    rows = [make_row("matmul", "", cfg["matmul_size"], cfg, matmul, peak)]
    rows += by_length([run_series(name, mode, cfg, peak) for name in names for mode in modes], cfg["lengths"])
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"bench_{slug}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    points = [r for r in rows if r["attention"] != "matmul"]
    title = f"{machine} · B={cfg['batch']} H={cfg['heads']} D={cfg['head_dim']} {cfg['dtype']}"
    plot(points, out / f"bench_{slug}.png", title)
    text = summary(points, cfg, machine, peak)
    (out / f"summary_{slug}.md").write_text(text)
    print(text)
    wrote(*(out / name for name in (f"bench_{slug}.csv", f"bench_{slug}.png", f"summary_{slug}.md")),
          file=sys.stderr)


if __name__ == "__main__":  # one point's subprocess (run_subprocess); the command is efficient-attn-bench
    if len(sys.argv) != 3 or sys.argv[1] != "--worker":
        raise SystemExit(f"usage: python -m {__spec__.name} --worker SPEC_JSON (the benchmark's own subprocess; "
                         "the command is efficient-attn-bench)")
    worker_main(sys.argv[2])
