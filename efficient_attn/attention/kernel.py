"""Linear (kernelized) attention machinery shared by ``favor`` and ``linear``.

out_i = φ(q_i)ᵀ Σ_j φ(k_j) v_jᵀ / φ(q_i)ᵀ Σ_j φ(k_j)   (sums over visible keys j)

The normalizer rides along as an extra column of ones appended to v, so numerator and
denominator come out of the same matrix products.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Attention


class KernelAttention(Attention):
    """Base for attentions of the form φ(q)ᵀφ(k)-weighted averages; subclasses define ``feature_map``.

    Features and products are computed in float32 (float64 if the inputs are float64), also under
    bf16/fp16 autocast; the output comes back in v's dtype. Padded keys get a zero row in the
    value-and-normalizer matrix, so their features never reach any output.
    """

    def __init__(self, head_dim: int, num_heads: int, *, chunk_size: int = 64) -> None:
        super().__init__(head_dim, num_heads)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size!r}")
        self.chunk_size = chunk_size

    def feature_map(self, x: Tensor, is_query: bool) -> Tensor:
        """(B, H, N, D) -> (B, H, N, M) non-negative (or, for trig features, signed) features."""
        raise NotImplementedError

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, causal: bool
    ) -> Tensor:
        out_dtype = v.dtype
        dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        with torch.autocast(q.device.type, enabled=False):
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
            v1 = F.pad(v, (0, 1), value=1.0)  # (B, H, S, Dv+1): last column sums the normalizer
            if key_padding_mask is not None:  # k, v are zero there already; drop their normalizer too
                v1 = v1.masked_fill(key_padding_mask[:, None, :, None], 0.0)
            phi_q = self.feature_map(q, is_query=True)  # (B, H, L, M)
            phi_k = self.feature_map(k, is_query=False)  # (B, H, S, M)
            if causal:
                out1 = causal_linear_attention(phi_q, phi_k, v1, self.chunk_size)
            else:
                out1 = phi_q @ (phi_k.transpose(-1, -2) @ v1)  # (B, H, L, M) @ (B, H, M, Dv+1)
            num, den = out1[..., :-1], out1[..., -1:]  # (B, H, L, Dv), (B, H, L, 1)
            out = num / torch.where(den == 0, 1.0, den)  # a query seeing no key gets 0, not NaN
        return out.to(out_dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, chunk_size={self.chunk_size}"


def causal_linear_attention(phi_q: Tensor, phi_k: Tensor, v: Tensor, chunk_size: int) -> Tensor:
    """Σ_{j≤i} (φ(q_i)·φ(k_j)) v_j for every i, by chunked prefix sums.

    Within a chunk: masked (C, C) products; across chunks: a running (M, E) state per chunk.
    Time O(L·M·E + L·C·(M+E)), memory O(L·(M+E) + (L/C)·M·E) -- never an (L, M, E) tensor.
    phi_q, phi_k (B, H, L, M), v (B, H, L, E) -> (B, H, L, E).
    """
    b, h, length, m = phi_q.shape
    e = v.shape[-1]
    c = min(chunk_size, length)
    pad = (-length) % c
    if pad:  # zero keys and values contribute nothing; padded query rows are sliced off
        phi_q, phi_k, v = (F.pad(t, (0, 0, 0, pad)) for t in (phi_q, phi_k, v))
    n = (length + pad) // c
    q = phi_q.reshape(b, h, n, c, m)  # (B, H, N, C, M)
    k = phi_k.reshape(b, h, n, c, m)  # (B, H, N, C, M)
    vc = v.reshape(b, h, n, c, e)  # (B, H, N, C, E)
    kv = k.transpose(-1, -2) @ vc  # (B, H, N, M, E): each chunk's Σ φ(k_j) v_jᵀ
    state = F.pad(kv.cumsum(2)[:, :, :-1], (0, 0, 0, 0, 1, 0))  # (B, H, N, M, E): earlier chunks only
    scores = torch.tril(q @ k.transpose(-1, -2))  # (B, H, N, C, C): j ≤ i inside the chunk
    out = q @ state + scores @ vc  # (B, H, N, C, E)
    return out.reshape(b, h, n * c, e)[:, :, :length]  # (B, H, L, E)
