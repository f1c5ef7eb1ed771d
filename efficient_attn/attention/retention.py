"""Retention (Sun et al. 2023, "Retentive Network: A Successor to Transformer for Large Language Models")."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops.differentiable import recompute_active, recompute_in_backward
from ..ops.numerics import upcast, upcast_call
from ..registry import register_attention
from .base import Attention, check_inputs, check_step


@register_attention("retention")
class RetentionAttention(Attention):
    """RetNet's retention: causal, unnormalised, a fixed decay γ_h per head.

    out_t = Σ_{j≤t} γ_h^{t−j} (scale · q_t·k_j) v_j,  γ_h = 1 − 2^{−5−h} for head h = 0..H−1 (RetNet),
    or ``gammas``: one value for every head or one per head, each in (0, 1] (γ = 1: no decay);
    scale = 1/√d by default (RetNet scales k by d^{−1/2}). No softmax and no normaliser: RetNet
    normalises each head with a GroupNorm (and gates it) outside this core, so rows are not weighted
    averages (their weights can be negative and need not sum to one).
    Three forms that agree: parallel (an (L, L) decay mask; :func:`parallel_retention`, the reference
    for short sequences), chunked (the forward: ``chunk_size`` C rows at once, a (D, Dv) state carried
    across chunks and decayed by γ^C; O(L·C·D + L·D·Dv) time, O(L·C + (L/C)·D·Dv) memory) and
    recurrent (:meth:`decode_step`: S_t = γ S_{t−1} + k_tᵀ v_t, out_t = scale · q_t S_t, S (B, H, D, Dv)).
    Masks: causal only (``causal=False`` raises: retention is a causal recurrence); self-attention
    only (S ≠ L raises); key padding yes: padded keys and values are zeroed, so they add nothing
    (they still count as positions in the decay), and a row that sees no real key outputs zeros.
    Computed in float32 (float64 stays float64), also under autocast; the output comes in v's dtype.

    ``rotary=True``: RetNet's relative position, the rotation part of xPos: q_t and k_t are rotated by
    t·θ before the product, θ_i = 1/10000^(i/(D/2−1)) for the pairs (2i, 2i+1), i = 0..D/2−1 (torchscale's
    ``RetNetRelPos``/``theta_shift``, microsoft/torchscale retnet.py and multiscale_retention.py), so
    q_t·k_j depends on t − j only; D must be even. Decoding then also keeps the position (``pos`` (B,)).
    RetNet's GroupNorm and swish gate are the layer options (configs/attention/retnet.yaml).
    Training memory: with ``recompute`` (the default) a forward keeps only q, k, v for backward, which runs the
    chunked form again (``recompute_in_backward``), not its (C, C) score blocks, decayed copies and per-chunk
    states, each (B, H, L, ·)-sized; the cost is one more forward. ``recompute=False`` keeps them.
    """

    supports_noncausal = False
    supports_cross_attention = False

    def __init__(
        self,
        head_dim: int,
        num_heads: int,
        *,
        gammas: float | Sequence[float] | None = None,
        scale: float | None = None,
        chunk_size: int = 64,
        rotary: bool = False,
        recompute: bool = True,
    ) -> None:
        super().__init__(head_dim, num_heads)
        if not isinstance(rotary, bool):
            raise ValueError(f"rotary must be a bool, got {rotary!r}")
        if rotary and head_dim % 2:
            raise ValueError(f"rotary rotates pairs of channels: head_dim must be even, got {head_dim}")
        self.rotary = rotary
        self.gammas = _gammas(gammas, num_heads)  # a tuple of floats: not a buffer, so no cast rounds it
        if scale is not None and not scale > 0:
            raise ValueError(f"scale must be positive, got {scale!r}")
        if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        self.scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
        self.chunk_size, self.recompute = chunk_size, bool(recompute)

    def log_gammas(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        """(H,) log γ_h, computed in float64 and then cast."""
        return torch.tensor(self.gammas, dtype=torch.float64, device=device).log().to(dtype)

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, causal: bool
    ) -> Tensor:
        # causal=False and S ≠ L were refused by the base class; padded k, v are zero already
        if recompute_active(self.recompute) and (q.requires_grad or k.requires_grad or v.requires_grad):
            return recompute_in_backward(self._retain_upcast, q, k, v)  # (B, H, L, Dv)
        return self._retain_upcast(q, k, v)

    def _retain_upcast(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return upcast_call(self._retain, q, k, v)

    def _retain(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        log_gamma = self.log_gammas(q.dtype, q.device)  # (H,)
        if self.rotary:
            pos = torch.arange(q.shape[2], dtype=q.dtype, device=q.device)  # (L,)
            q, k = rotate(q, pos), rotate(k, pos)
        return chunked_retention(q * self.scale, k, v, log_gamma, self.chunk_size)  # (B, H, L, Dv)

    def prefill(self, k: Tensor, v: Tensor) -> dict[str, Tensor]:
        """The recurrent state after positions 0..t−1 in one product: S = Σ_j γ^{t−1−j} k_jᵀ v_j."""
        check_inputs(k, k, v, None, True, self.num_heads, self.head_dim)
        with torch.autocast(k.device.type, enabled=False):
            _, k, v = upcast(k, k, v)
            if self.rotary:
                k = rotate(k, torch.arange(k.shape[2], dtype=k.dtype, device=k.device))  # (B, H, t, D)
            age = torch.arange(k.shape[2] - 1, -1, -1, device=k.device, dtype=k.dtype)  # (t,): t−1−j
            decay = (self.log_gammas(k.dtype, k.device)[:, None] * age).exp()  # (H, t)
            kv = (k * decay[:, :, None]).transpose(-1, -2) @ v  # (B, H, D, Dv)
        if self.rotary:
            return {"kv": kv, "pos": torch.full((k.shape[0],), k.shape[2], dtype=torch.long, device=k.device)}
        return {"kv": kv}

    def decode_step(
        self, q: Tensor, k: Tensor, v: Tensor, state: dict[str, Tensor] | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The recurrent form, O(D·Dv) per step whatever t: state ``kv`` = S_t (B, H, D, Dv) (with ``rotary``
        also ``pos`` (B,), the next position)."""
        check_step(q, k, v)
        check_inputs(q, k, v, None, True, self.num_heads, self.head_dim)
        out_dtype = v.dtype
        with torch.autocast(q.device.type, enabled=False):
            q, k, v = upcast(q, k, v)
            if self.rotary:
                pos = torch.zeros(q.shape[0], dtype=torch.long, device=q.device) if state is None else state["pos"]
                angle = pos.to(q.dtype)[:, None, None]  # (B, 1, 1): every head and row of sample b at pos[b]
                q, k = rotate(q, angle), rotate(k, angle)
            kv = k.transpose(-1, -2) @ v  # (B, H, D, Dv): k_tᵀ v_t
            if state is not None:
                gamma = self.log_gammas(q.dtype, q.device).exp()[:, None, None]  # (H, 1, 1)
                kv = state["kv"] * gamma + kv  # S_t = γ S_{t−1} + k_tᵀ v_t
            out = (q * self.scale) @ kv  # (B, H, 1, Dv)
        if self.rotary:
            return out.to(out_dtype), {"kv": kv, "pos": pos + 1}
        return out.to(out_dtype), {"kv": kv}

    def extra_repr(self) -> str:
        gammas = ", ".join(f"{g:.6g}" for g in self.gammas)
        rotary = ", rotary=True" if self.rotary else ""
        chunk = f"chunk_size={self.chunk_size}{rotary}"
        return f"{super().extra_repr()}, gammas=({gammas}), scale={self.scale:.4g}, {chunk}"


def rotate(x: Tensor, pos: Tensor) -> Tensor:
    """x (..., L, D) with each channel pair (2i, 2i+1) of row l rotated by the angle pos_l·θ_i (RetNet's
    xPos rotation), θ_i = 10000^(−i/(D/2−1)); ``pos`` broadcasts against x's leading dims and L (e.g. (L,))."""
    half = x.shape[-1] // 2
    theta = 10000.0 ** -torch.linspace(0.0, 1.0, half, dtype=torch.float64, device=x.device)  # (D/2,)
    angle = pos[..., None].to(torch.float64) * theta  # (..., L, D/2)
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    even, odd = x[..., 0::2], x[..., 1::2]  # (..., L, D/2) each
    return torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2)  # (..., L, D)


def _gammas(gammas: float | Sequence[float] | None, num_heads: int) -> tuple[float, ...]:
    """RetNet's γ_h = 1 − 2^{−5−h} by default; else one γ for all heads or one per head, each in (0, 1]."""
    if gammas is None:
        return tuple(1.0 - 2.0 ** (-5 - h) for h in range(num_heads))
    if isinstance(gammas, (int, float)) and not isinstance(gammas, bool):
        values = [float(gammas)] * num_heads
    elif isinstance(gammas, Sequence) and not isinstance(gammas, str):
        values = [float(g) for g in gammas]
    else:
        raise ValueError(f"gammas must be a float or a list of {num_heads} floats (one per head), got {gammas!r}")
    if len(values) != num_heads or not all(0.0 < g <= 1.0 for g in values):
        raise ValueError(f"gammas must be {num_heads} decays (one per head) in (0, 1], got {list(values)}")
    return tuple(values)


def _decay(log_gamma: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """(H, R, C) γ^{i−j} for row positions i and column positions j with j ≤ i, 0 above (no overflow)."""
    gap = rows[:, None] - cols[None, :]  # (R, C): i − j
    return torch.exp(log_gamma[:, None, None] * gap.clamp_min(0)).masked_fill(gap < 0, 0.0)


def parallel_retention(q: Tensor, k: Tensor, v: Tensor, log_gamma: Tensor) -> Tensor:
    """The parallel form: (Q Kᵀ ⊙ D) V, D[i, j] = γ^{i−j} (j ≤ i), an (L, L) mask; q (B, H, L, D) scaled."""
    pos = torch.arange(q.shape[-2], dtype=q.dtype, device=q.device)  # (L,)
    return ((q @ k.transpose(-1, -2)) * _decay(log_gamma, pos, pos)) @ v  # (B, H, L, Dv)


def chunked_retention(q: Tensor, k: Tensor, v: Tensor, log_gamma: Tensor, chunk_size: int) -> Tensor:
    """The chunkwise form: q (B, H, L, D) (scaled), k (B, H, L, D), v (B, H, L, Dv), log γ (H,).

    Chunk n's row i (of C): Σ_{j≤i in chunk} γ^{i−j} (q_i·k_j) v_j + γ^{i+1} q_i S_n, where S_n is the
    state after the previous chunks: S_{n+1} = γ^C S_n + Σ_j γ^{C−1−j} k_jᵀ v_j. The last chunk is
    padded with zero rows (they add nothing and their outputs are dropped).
    """
    b, h, length, d = q.shape
    c = max(1, min(chunk_size, length))
    n = -(-length // c)  # chunks
    pad = (0, 0, 0, n * c - length)
    qc, kc, vc = (F.pad(t, pad).view(b, h, n, c, -1) for t in (q, k, v))  # (B, H, N, C, ·)
    pos = torch.arange(c, dtype=q.dtype, device=q.device)  # (C,)
    out = ((qc @ kc.transpose(-1, -2)) * _decay(log_gamma, pos, pos)[:, None]) @ vc  # (B, H, N, C, Dv)
    if n > 1:
        lg = log_gamma[:, None]  # (H, 1)
        into_state = torch.exp(lg * (c - 1 - pos))[:, None, :, None]  # (H, 1, C, 1): γ^{C−1−j}
        from_state = torch.exp(lg * (pos + 1))[:, None, :, None]  # (H, 1, C, 1): γ^{i+1}
        chunk_decay = torch.exp(lg * c)[..., None]  # (H, 1, 1): γ^C
        kv = (kc * into_state).transpose(-1, -2) @ vc  # (B, H, N, D, Dv): each chunk's Σ_j γ^{C−1−j} k_jᵀ v_j
        states = [kv.new_zeros(b, h, d, kv.shape[-1])]  # S_0 = 0
        # unbind, not kv[:, :, i]: each index's backward fills a zero tensor the size of kv, O(N²) in all
        for kv_i in kv.unbind(dim=2)[:-1]:  # N−1 × (B, H, D, Dv)
            states.append(states[-1] * chunk_decay + kv_i)  # (B, H, D, Dv)
        out = out + (qc * from_state) @ torch.stack(states, dim=2)  # (B, H, N, C, Dv)
    return out.reshape(b, h, n * c, -1)[:, :, :length]  # (B, H, L, Dv)
