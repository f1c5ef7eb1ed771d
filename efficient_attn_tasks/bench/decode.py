"""Benchmark mode ``decode``, the worker side: generation speed at context L through the real decoding states.

One point: the state after an L-token prefix (``attn.prefill``, timed), then timed ``decode_step`` calls (the
median per token) and the size of the decoding state after them (a KV cache grows with L, a kernel attention's
running sum does not). ``sdpa`` decodes from :class:`PreallocatedCache`, a KV cache allocated once and written
in place. The series, CSV and summary are :mod:`efficient_attn_tasks.bench.kernels`'s. No torch at module level.
"""

from __future__ import annotations

import resource
import statistics
import time
from typing import Any

from efficient_attn_tasks.bench.points import DTYPES, MIB, attention_module, rss_mib
from efficient_attn_tasks.bench.sdpa import SDPA_BACKENDS, sdpa_backend


def _state_mib(state: Any) -> float:
    """Bytes of every tensor in a decoding state, in MiB."""
    import torch

    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size() / MIB
    if isinstance(state, dict):
        state = list(state.values())
    return sum(_state_mib(x) for x in state) if isinstance(state, (list, tuple)) else 0.0


class PreallocatedCache:
    """The ``sdpa`` decoding baseline: a KV cache allocated once for L + steps positions, written in place."""

    def __init__(self, k: Any, v: Any, capacity: int, name: str = "sdpa") -> None:
        import torch

        b, h, length, d = k.shape
        self.k = torch.empty(b, h, capacity, d, device=k.device, dtype=k.dtype)  # (B, H, capacity, D)
        self.v = torch.empty(b, h, capacity, v.shape[-1], device=v.device, dtype=v.dtype)
        self.k[:, :, :length], self.v[:, :, :length] = k, v
        self.length, self.name = length, name

    def decode_step(self, q: Any, k: Any, v: Any, state: Any) -> tuple[Any, Any]:
        import torch.nn.functional as F

        t = self.length
        self.k[:, :, t : t + 1], self.v[:, :, t : t + 1] = k, v
        self.length = t + 1
        with sdpa_backend(self.name):
            out = F.scaled_dot_product_attention(q, self.k[:, :, : t + 1], self.v[:, :, : t + 1])  # (B, H, 1, Dv)
        return out, {"k": self.k, "v": self.v}


def run_decode(spec: dict[str, Any]) -> dict[str, Any]:
    """Time ``decode_steps`` generation steps after an L-token prefix; no gradients."""
    import torch

    torch.set_num_threads(spec["threads"])
    device, cuda = torch.device(spec["device"]), spec["device"].startswith("cuda")
    dtype = getattr(torch, DTYPES[spec["dtype"]])
    steps = spec["decode_steps"]
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (spec["batch"], spec["heads"], spec["L"], spec["head_dim"])
    k, v = (torch.randn(shape, generator=gen, device=device, dtype=dtype) for _ in range(2))  # (B, H, L, D)
    new = [torch.randn(3, *shape[:2], 1, shape[3], generator=gen, device=device, dtype=dtype) for _ in range(steps + 1)]

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    with torch.no_grad():
        base_rss = rss_mib()
        sync()
        start = time.perf_counter()
        if spec["attention"] in SDPA_BACKENDS:
            module, state = PreallocatedCache(k, v, spec["L"] + steps + 1, spec["attention"]), None
        else:
            module = attention_module(spec).eval()
            state = module.prefill(k, v)
        sync()
        prefill_s = time.perf_counter() - start
        del k, v
        times = []
        for i, (q1, k1, v1) in enumerate(new):  # step 0 is the warm-up
            start = time.perf_counter()
            _, state = module.decode_step(q1, k1, v1, state)
            sync()
            if i:
                times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {
        "status": "ok", "time_s": median, "time_min_s": min(times), "tokens_per_s": spec["batch"] / median,
        "prefill_s": prefill_s, "state_mib": _state_mib(state), "base_rss_mib": base_rss,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_cuda_mib": torch.cuda.max_memory_allocated() / MIB if cuda else None,
    }
