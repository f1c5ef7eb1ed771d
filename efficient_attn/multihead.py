"""Multi-head wrapper: the Q/K/V/O projections every variant shares, so comparisons isolate the core."""

from __future__ import annotations

from typing import Any

from einops import rearrange
from torch import Tensor, nn

from .registry import create_attention


class MultiHeadAttention(nn.Module):
    """Project to heads, run a registered core attention, merge heads, project out.

    query (B, L, d_model), key/value (B, S, d_model) (default: key = value = query) -> (B, L, d_model).
    ``dropout`` applies to the merged head outputs before the output projection (attention-weight
    dropout is not defined for kernelized variants, so it is not offered to any, for a fair comparison).
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        attention: str = "softmax",
        attention_kwargs: dict[str, Any] | None = None,
        dropout: float = 0.0,
        *,
        head_dim: int | None = None,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if num_heads < 1 or d_model < 1:
            raise ValueError(f"d_model and num_heads must be positive, got {d_model}, {num_heads}")
        if head_dim is None:
            if d_model % num_heads:
                raise ValueError(
                    f"d_model={d_model} is not divisible by num_heads={num_heads}; "
                    "change one of them or set head_dim explicitly"
                )
            head_dim = d_model // num_heads
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.d_model, self.num_heads, self.head_dim = d_model, num_heads, head_dim
        inner = num_heads * head_dim
        self.q_proj = nn.Linear(d_model, inner, bias=bias)
        self.k_proj = nn.Linear(d_model, inner, bias=bias)
        self.v_proj = nn.Linear(d_model, inner, bias=bias)
        self.out_proj = nn.Linear(inner, d_model, bias=bias)
        self.attention = create_attention(
            attention, head_dim=head_dim, num_heads=num_heads, **(attention_kwargs or {})
        )
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        *,
        key_padding_mask: Tensor | None = None,
        causal: bool = False,
    ) -> Tensor:
        key = query if key is None else key
        value = key if value is None else value
        if query.dim() != 3 or key.dim() != 3 or value.dim() != 3 or query.shape[-1] != self.d_model:
            raise ValueError(
                f"expected (B, L, {self.d_model}) inputs, got query {tuple(query.shape)}, "
                f"key {tuple(key.shape)}, value {tuple(value.shape)}"
            )
        k, v = self.project_kv(key, value)  # (B, H, S, D) each
        return self.attend_projected(query, k, v, key_padding_mask=key_padding_mask, causal=causal)

    def project_kv(self, key: Tensor, value: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(B, S, d_model) keys/values -> heads (B, H, S, D); decoders cache this for cross-attention."""
        value = key if value is None else value
        k = rearrange(self.k_proj(key), "b s (h d) -> b h s d", h=self.num_heads)  # (B, H, S, D)
        v = rearrange(self.v_proj(value), "b s (h d) -> b h s d", h=self.num_heads)  # (B, H, S, D)
        return k, v

    def attend_projected(
        self,
        query: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        key_padding_mask: Tensor | None = None,
        causal: bool = False,
    ) -> Tensor:
        """Attention of (B, L, d_model) queries over already projected keys/values (B, H, S, D)."""
        q = rearrange(self.q_proj(query), "b l (h d) -> b h l d", h=self.num_heads)  # (B, H, L, D)
        out = self.attention(q, k, v, key_padding_mask=key_padding_mask, causal=causal)  # (B, H, L, D)
        return self._merge(out)

    def attend_cached(self, query: Tensor, memory: dict[str, Tensor | None]) -> Tensor:
        """Queries (B, L, d_model) against ``attention.cache_memory(*project_kv(memory))``."""
        q = rearrange(self.q_proj(query), "b l (h d) -> b h l d", h=self.num_heads)  # (B, H, L, D)
        return self._merge(self.attention.attend_memory(q, memory))

    def decode_step(
        self, x: Tensor, state: dict[str, Tensor] | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Causal self-attention for one new position: x (B, 1, d_model) -> ((B, 1, d_model), state).

        The state is the core attention's (a key/value cache, or a running sum for kernelized
        variants); every tensor in it has the batch first, so beam search can reorder it.
        """
        if x.dim() != 3 or x.shape[1] != 1 or x.shape[-1] != self.d_model:
            raise ValueError(f"decode_step expects (B, 1, {self.d_model}), got {tuple(x.shape)}")
        q = rearrange(self.q_proj(x), "b l (h d) -> b h l d", h=self.num_heads)  # (B, H, 1, D)
        k, v = self.project_kv(x)  # (B, H, 1, D) each
        out, state = self.attention.decode_step(q, k, v, state)  # (B, H, 1, D)
        return self._merge(out), state

    def _merge(self, out: Tensor) -> Tensor:
        out = rearrange(out, "b h l d -> b l (h d)")  # (B, L, H·D)
        return self.out_proj(self.dropout(out))  # (B, L, d_model)
