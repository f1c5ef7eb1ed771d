"""One measured point of ``efficient-attn-bench``, shared by its modes (kernels, decode, train).

Owns the worker subprocess protocol (the spawned command, the ``BENCH_RESULT`` line), the point's memory and
time limits, the reasons a point is not run, and the order that measures every series one L at a time.
No torch at module level.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from typing import Any, Callable, Iterator

from efficient_attn_tasks.bench.sdpa import SDPA_BACKENDS

BASELINES = ["performer_pytorch", "sdpa"]
FAILED = ("timeout", "oom", "error")
MARK = "BENCH_RESULT "
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
MIB = 2**20
WORKER = "efficient_attn_tasks.bench.kernels"  # the module whose ``--worker`` entry runs one point


# ---------------------------------------------------------------- worker side (one point per process)

def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


def cap_address_space() -> None:
    """Let this process map at most its current size plus 90% of free RAM: OOM becomes an exception."""
    with open("/proc/self/status") as f:
        vm_size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    limit = vm_size + int(0.9 * _available_bytes())
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def attention_module(spec: dict[str, Any]):
    """The registered attention of ``spec`` with the benchmark's options: ``num_features`` for
    feature-based variants, ``max_len`` (cosFormer's M) covering every position the point uses."""
    import efficient_attn as ea

    name, options = spec["attention"], ea.attention_options(spec["attention"])
    kwargs = {"num_features": spec["num_features"]} if "num_features" in options else {}
    if "max_len" in options:
        kwargs["max_len"] = spec["L"] + spec.get("decode_steps", 0) + 1
    module = ea.create_attention(name, head_dim=spec["head_dim"], num_heads=spec["heads"], **kwargs)
    return module.to(spec["device"])

# ---------------------------------------------------------------- parent side

def run_subprocess(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one point in a fresh interpreter with the thread count pinned (so its peak memory is its own);
    never raises."""
    threads = str(spec["threads"])
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    cmd = [sys.executable, "-m", WORKER, "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "message": f"over {timeout:g} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    if proc.returncode in (-9, 137):
        return {"status": "oom", "message": "killed by SIGKILL (likely out of memory)"}
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
    return {"status": "error", "message": f"exit {proc.returncode}: {tail}"}


def estimate_bytes(name: str, length: int, cfg: dict[str, Any]) -> float | None:
    """Rough peak bytes for variants whose memory is known to blow up; None = not estimated."""
    elem = cfg["batch"] * cfg["heads"] * {"fp32": 4, "bf16": 2, "fp16": 2}[cfg["dtype"]]
    if name == "additive":  # scores, weights and their grads: 4 (B, H, L, L) tensors
        return 4 * elem * length**2
    return None


def not_applicable(name: str, mode: str) -> str | None:
    """Why ``name`` cannot run ``mode`` (a causal-only variant non-causally; a baseline without decoding)."""
    if mode == "decode":
        return "performer-pytorch has no incremental decoding" if name == "performer_pytorch" else None
    if name in BASELINES or name in SDPA_BACKENDS:
        return None
    import efficient_attn as ea
    from efficient_attn.attention.base import unsupported_use

    return unsupported_use(ea.get_attention_class(name), causal=mode != "noncausal", cross=False)


def time_left(cfg: dict[str, Any]) -> float:
    """Seconds the next point may run: ``--timeout``, or less where the run's ``--budget`` ends first
    (<= 0: the budget is spent)."""
    deadline = cfg.get("deadline")
    return cfg["timeout"] if deadline is None else min(cfg["timeout"], deadline - time.monotonic())


def not_run(reason: str | None, stop: str | None, limit: float, device: str, need_bytes: float | None,
            predicted_s: float, too_slow: str) -> dict[str, Any] | None:
    """Why a series' next point is not run (its result row), or None to run it: the mode does not
    apply, an earlier point failed, the budget is spent, it would not fit in free RAM (CPU), or its
    predicted time (``predicted_s``, explained by ``too_slow``) exceeds ``limit``."""
    if reason:
        return {"status": "n/a", "message": reason}
    if stop:
        return {"status": "skipped", "message": stop}
    if limit <= 0:
        return {"status": "skipped", "message": "the run's --budget is spent"}
    if device == "cpu" and need_bytes and need_bytes > _available_bytes():
        return {"status": "skipped", "message": f"estimated {need_bytes / 2**30:.1f} GiB > available RAM"}
    if predicted_s > limit:
        return {"status": "skipped", "message": too_slow}
    return None


def next_stop(result: dict[str, Any], stop: str | None, length: int) -> str | None:
    """After a failed or skipped point, every larger L of the series is skipped with this message."""
    if result["status"] in FAILED or (result["status"] == "skipped" and not stop):
        return f"after {result['status']} at L={length}"
    return stop


def by_length(series: list[Iterator[dict[str, Any]]], lengths: list[int],
              after: Callable[[list[dict[str, Any]]], None] | None = None) -> list[dict[str, Any]]:
    """Every series' rows, measured one L at a time (each series' point at that L, then the next L), so
    the points compared at one L are minutes apart, not the whole run apart: a shared machine's drift
    hits them alike. ``after(rows at that L)`` runs after each L. Returned grouped by series."""
    rows: list[list[dict[str, Any]]] = [[] for _ in series]
    for _ in lengths:
        measured = [next(s) for s in series]
        for own, row in zip(rows, measured):
            own.append(row)
        if after is not None:
            after(measured)
    return [row for own in rows for row in own]
