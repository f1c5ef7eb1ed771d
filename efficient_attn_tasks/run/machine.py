"""The machine facts a run record carries: the run's peak memory (GPU memory allocated, else the process's peak
resident set size), the hardware it ran on, and the versions of Python and the packages that shape its numbers.

Importing this module loads neither torch nor Lightning; each helper that reads torch imports it.
"""

from __future__ import annotations

import platform
import resource
from pathlib import Path


def reset_peak_memory() -> None:
    """Start a fresh peak for this run (multirun jobs share one process)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets the peak resident set size (VmHWM)
    except OSError:
        pass


def peak_memory_mib() -> float:
    """Peak GPU memory allocated if CUDA was used, else the process's peak resident set size since
    :func:`reset_peak_memory` (Linux VmHWM; elsewhere the lifetime peak)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        status = Path("/proc/self/status").read_text().splitlines()
        return next(int(ln.split()[1]) for ln in status if ln.startswith("VmHWM")) / 1024  # kB
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def hardware() -> str:
    """The GPU, or the CPU's name, family/model and the vector ISA torch dispatches to, and the thread count."""
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    cpu = platform.processor() or platform.machine()
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())  # the first processor's fields
    except OSError:
        pass
    cpu = info.get("model name", cpu)
    detail = [f"family {info['cpu family']} model {info['model']}"] if "cpu family" in info and "model" in info else []
    detail.append(torch.backends.cpu.get_cpu_capability())
    return f"{cpu} ({', '.join(detail)}), {torch.get_num_threads()} threads"


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("efficient-attn", "torch", "pytorch-lightning", "hydra-core", "wandb", "sacrebleu", "sentencepiece"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out
