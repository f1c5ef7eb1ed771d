"""The benchmark's FlexAttention baselines: ``torch.nn.attention.flex_attention`` under ``torch.compile``.

``flex`` is softmax attention (causal: key j ≤ query i); ``flex_window`` is the band of the registry's
``sliding_window`` built with the benchmark's options (so the same window w), in its convention: causal
i − w < j ≤ i (the query and the w − 1 keys before it), non-causal |i − j| < w. Each point compiles
``flex_attention`` once and builds its block mask once (a model reuses one mask across its layers), both
before the timing: the worker's warm-up call compiles. FlexAttention has no backward on CPU (torch raises
for inputs that require grad), so a CPU point is timed forward only: status ``forward only``, ``forward_s``
set, ``time_s`` empty; on CUDA it is timed forward+backward as every attention is. For the comparison the
summary makes, the attentions in :data:`FORWARD_TIMED` also get a forward-only time (``forward_s``, no
autograd) in the same point. Imports no torch at module level (``efficient-attn-bench --help`` stays fast).
"""

from __future__ import annotations

from typing import Any, Callable

from efficient_attn_tasks.bench.points import attention_module

FLEX_BASELINES = {"flex": "softmax", "flex_window": "sliding_window"}  # baseline -> registered attention it mirrors
FORWARD_TIMED = {"sdpa", *FLEX_BASELINES, *FLEX_BASELINES.values()}  # points that also time a forward alone
FORWARD_ONLY = "forward only"  # the status of a point timed without its backward


def flex_unavailable(name: str, mode: str) -> str | None:
    """Why the baseline ``name`` cannot run ``mode`` (recorded as ``n/a``), else None; None for every other name."""
    if name not in FLEX_BASELINES:
        return None
    if mode not in ("causal", "noncausal"):
        return "FlexAttention is a baseline of the kernel modes (causal, noncausal) only"
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except ImportError:
        return "needs torch.nn.attention.flex_attention (torch >= 2.5)"
    return None


def forward_only(name: str, device: str) -> bool:
    """Whether ``name`` is timed without its backward on ``device`` (FlexAttention on CPU)."""
    return name in FLEX_BASELINES and not device.startswith("cuda")


def mask_mod(causal: bool, window: int | None) -> Callable[[Any, Any, Any, Any], Any] | None:
    """FlexAttention's ``mask_mod(b, h, q_idx, kv_idx)`` (True = attend) of the band, or None for every key."""
    if window is None:
        return (lambda b, h, q, kv: kv <= q) if causal else None
    if causal:
        return lambda b, h, q, kv: (kv <= q) & (q - kv < window)
    return lambda b, h, q, kv: (q - kv < window) & (kv - q < window)


def window_of(spec: dict[str, Any]) -> int:
    """The window w of the benchmark's ``sliding_window`` (built with the point's options)."""
    return attention_module(spec | {"attention": "sliding_window"}).window


def build_flex(spec: dict[str, Any]) -> Callable:
    """The compiled f(q, k, v) of the point ``spec`` (attention ``flex`` or ``flex_window``), block mask built."""
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    causal = spec["mode"] == "causal"
    mod = mask_mod(causal, window_of(spec) if spec["attention"] == "flex_window" else None)
    length = spec["L"]
    block_mask = None if mod is None else create_block_mask(mod, None, None, length, length, device=spec["device"])
    compiled = torch.compile(flex_attention)

    def flex(q: Any, k: Any, v: Any) -> Any:
        return compiled(q, k, v, block_mask=block_mask)

    return flex
