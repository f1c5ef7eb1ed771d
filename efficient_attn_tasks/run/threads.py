"""How many threads a run gets: the user's ``threads``, a joblib job's share of the cores, or the cores that
other processes leave free when the run starts. With every core in use, one torch thread more than the free
cores makes OpenMP threads spin at barriers while they wait for a descheduled peer: a 2-thread quickstart
beside one CPU-bound process took 19x its idle time, and 1.0x at 1 thread (results/benchmarks/contention/).
The waiting policy (``OMP_WAIT_POLICY``, set before torch loads: efficient_attn_tasks/__init__.py) bounds the
damage when the load arrives after the start."""

from __future__ import annotations

import os
import time
from pathlib import Path

PROC_STAT = Path("/proc/stat")


def _cpu_times(cpus: set[int], stat: Path = PROC_STAT) -> tuple[float, float] | None:
    """(busy, total) clock ticks summed over ``cpus`` from ``/proc/stat``; None where it cannot be read."""
    busy = total = 0.0
    try:
        lines = stat.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        name, *fields = line.split()
        if not (name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus):
            continue
        ticks = [float(x) for x in fields[:8]]  # user nice system idle iowait irq softirq steal
        total += sum(ticks)
        busy += sum(ticks) - ticks[3] - ticks[4]
    return (busy, total) if total else None


def busy_cores(interval: float = 0.25, stat: Path = PROC_STAT) -> float | None:
    """Cores kept busy by other processes, averaged over ``interval`` seconds while this one sleeps (0 to the
    number of cores this process may use); None off Linux or where ``/proc/stat`` says nothing."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    first = _cpu_times(cpus, stat)
    time.sleep(interval)
    second = _cpu_times(cpus, stat)
    if first is None or second is None or second[1] <= first[1]:
        return None
    return len(cpus) * (second[0] - first[0]) / (second[1] - first[1])


def default_threads(threads: int | None, n_jobs: int | None, cpus: int, busy: float | None = None) -> int | None:
    """Torch threads for one run: ``threads`` when set; for a job of a joblib multirun (``n_jobs`` = the
    launcher's n_jobs, None when not under joblib) that runs k > 1 jobs at once, max(1, cpus // k), so
    the jobs share the cores instead of each starting one thread per core; else the cores that ``busy``
    (other processes' load, :func:`busy_cores`) leaves free, rounded, at least 1, when at least half a core
    is busy; else None (torch's default). A negative n_jobs counts back from the CPU count (-1: all of them),
    as in joblib."""
    if threads:
        return int(threads)
    if n_jobs is not None:
        at_once = cpus + 1 + n_jobs if n_jobs < 0 else n_jobs
        if at_once > 1:
            return max(1, cpus // at_once)
    if busy is None or busy < 0.5:
        return None
    return max(1, min(cpus, int(cpus - busy + 0.5)))
