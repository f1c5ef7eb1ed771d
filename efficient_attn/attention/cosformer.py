"""cosFormer (Qin et al. 2022, "cosFormer: Rethinking Softmax in Attention", ICLR)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..ops.numerics import normalize, upcast_with_ones
from ..registry import register_attention
from .base import check_inputs, check_step
from .kernel import KernelAttention


@register_attention("cosformer")
class CosformerAttention(KernelAttention):
    """ReLU linear attention re-weighted by cos of the relative position.

    sim(q_i, k_j) = φ(q_i)·φ(k_j) · cos(π/2 · (i − j)/M),  φ(x) = ReLU(x) + ε (ε = ``kernel_eps``),
    out_i = Σ_j sim(q_i, k_j) v_j / Σ_j sim(q_i, k_j), i, j the query's and the key's positions
    (0-based row indices). cos(a − b) = cos a cos b + sin a sin b makes it one linear attention with
    2D features [φ(x_i) cos θ_i, φ(x_i) sin θ_i], θ_i = π i/(2M): O(L·D·Dv) time, O(L·(D+Dv))
    memory; causal by chunked prefix sums (``chunk_size``); decoding keeps a constant
    (B, H, 2D, Dv+1) state plus its position.
    M (the re-weighting horizon): with ``max_len`` None (the default), M = the sequence length of the
    call, L (padded positions included), as the official code does (``m = max(src_len, tgt_len)``,
    github.com/OpenNLPLab/cosFormer; S == L here): the smallest weight, at |i − j| = L − 1, is
    cos(π/2·(L−1)/L), near 0, whatever L. A causal row's output then depends on L, not only on the keys
    it sees. With ``max_len`` an int, M = ``max_len`` for every call (the paper's "maximum sequence
    length"); a longer sequence (or a decoding step at position ≥ M) raises. Every |i − j| < M, so
    every weight is in (0, 1].
    Decoding (``decode_step``, ``prefill``) needs M before the final length is known: it uses
    ``max_len`` and raises a ValueError when ``max_len`` is None. Stepping through a sequence equals
    the causal forward with the same M (an int ``max_len``, or ``max_len`` = L against the default).
    ε > 0 keeps normalizers positive: without it a query whose ReLU features share no positive
    coordinate with any visible key has a zero normalizer (it then outputs zeros, never NaN),
    as FAVOR+'s ReLU kernel handles it (``kernel_eps``); features stay ≥ 0 (θ ∈ [0, π/2)).
    Self-attention only (S == L): i − j is a distance within one sequence, as the paper uses it;
    cross-attention raises (``supports_cross_attention``).
    Masks: key padding yes (padded positions still count in i − j); causal yes.
    """

    supports_cross_attention = False

    def __init__(
        self,
        head_dim: int,
        num_heads: int,
        *,
        max_len: int | None = None,
        kernel_eps: float = 1e-3,
        chunk_size: int = 64,
        recompute: bool = True,
    ) -> None:
        super().__init__(head_dim, num_heads, chunk_size=chunk_size, recompute=recompute)
        if max_len is not None and (not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 1):
            raise ValueError(f"max_len must be a positive int or None (M = the sequence length), got {max_len!r}")
        if not kernel_eps >= 0:
            raise ValueError(f"kernel_eps must be >= 0, got {kernel_eps!r}")
        self.max_len, self.kernel_eps = max_len, float(kernel_eps)

    def feature_map(
        self, x: Tensor, is_query: bool, *, fresh_grad: bool = False, start: int = 0
    ) -> tuple[Tensor, None]:
        """(B, H, N, D) rows at positions start..start+N−1 -> (B, H, N, 2D), exact as returned.

        M = ``max_len``, or N (the whole sequence, as ``attend`` passes it) when ``max_len`` is None."""
        n = x.shape[-2]
        horizon = n if self.max_len is None else self.max_len
        if start + n > horizon:
            raise ValueError(
                f"cosformer: position {start + n - 1} is beyond max_len={self.max_len} (M in "
                "cos(π/2·(i−j)/M)); raise the attention's max_len"
            )
        positions = torch.arange(start, start + n, device=x.device, dtype=x.dtype)  # (N,)
        theta = (positions * (math.pi / (2 * horizon)))[:, None]  # (N, 1)
        trig = torch.stack([torch.cos(theta), torch.sin(theta)], dim=-2)  # (N, 2, 1)
        phi = torch.relu(x) + self.kernel_eps  # (B, H, N, D)
        return (phi[..., None, :] * trig).flatten(-2), None  # (B, H, N, 2, D) -> (B, H, N, 2D): [φ cos θ, φ sin θ]

    def _check_decoding(self) -> None:
        if self.max_len is None:
            raise ValueError(
                "cosformer: decoding needs a fixed M in cos(π/2·(i−j)/M), but max_len is None (M = each call's "
                "sequence length); set the attention's max_len (e.g. attention.kwargs.max_len=<longest length>)"
            )

    def prefill(self, k: Tensor, v: Tensor) -> dict[str, Tensor | int]:
        """The decoding state after positions 0..t−1: the kernel sum and ``position`` = t (needs ``max_len``)."""
        check_inputs(k, k, v, None, True, self.num_heads, self.head_dim)
        self._check_decoding()
        return super().prefill(k, v) | {"position": k.shape[2]}

    def decode_step(
        self, q: Tensor, k: Tensor, v: Tensor, state: dict[str, Tensor | int] | None = None
    ) -> tuple[Tensor, dict[str, Tensor | int]]:
        """One causal step: state ``kv`` = Σ_{j≤t} φ(k_j, j)[v_j, 1]ᵀ (B, H, 2D, Dv+1) and
        ``position`` = t + 1 (an int, like the decoder's own position); M = ``max_len`` (None raises)."""
        check_step(q, k, v)
        check_inputs(q, k, v, None, True, self.num_heads, self.head_dim)
        self._check_decoding()
        t = 0 if state is None else state["position"]
        out_dtype = v.dtype
        with torch.autocast(q.device.type, enabled=False):
            q, k, v1 = upcast_with_ones(q, k, v)  # v1 (B, H, 1, Dv+1)
            phi_k, _ = self.feature_map(k, is_query=False, start=t)  # (B, H, 1, 2D)
            kv = phi_k.transpose(-1, -2) @ v1  # (B, H, 2D, Dv+1)
            if state is not None:
                kv = state["kv"] + kv
            out1 = self.feature_map(q, is_query=True, start=t)[0] @ kv  # (B, H, 1, Dv+1)
        return normalize(out1).to(out_dtype), {"kv": kv, "position": t + 1}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, max_len={self.max_len}, kernel_eps={self.kernel_eps:.3g}"
