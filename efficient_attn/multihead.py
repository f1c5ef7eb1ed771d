"""Multi-head wrapper: the Q/K/V/O projections every variant shares, so comparisons isolate the core."""

from __future__ import annotations

from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from .attention.base import private_rng
from .registry import create_attention, get_attention_class


class MultiHeadAttention(nn.Module):
    """Project to heads, run a registered core attention, merge heads, project out.

    query (B, L, d_model), key/value (B, S, d_model) (default: key = value = query) -> (B, L, d_model).
    ``dropout`` applies to the merged head outputs before the output projection (attention-weight
    dropout is not defined for kernelized variants, so it is not offered to any, for a fair comparison).
    The core attention is built on a fork of torch's RNG, so under the same ``torch.manual_seed`` the
    Q/K/V/O projections, and everything built after this module, are the same for every variant.

    Padding (``key_padding_mask`` (B, S) bool, True = padding) reaches neither outputs nor gradients,
    whatever the padded rows hold (inf/NaN included): padded key/value rows are zeroed *before* the
    k/v projections, so no 0·NaN enters a weight gradient and their input gradient is exactly zero.
    In self-attention (``key`` None) with ``key_padding_mask`` the queries are the same padded
    sequence: padded query rows are zeroed before the q projection too, and **padded positions
    output zeros** (not ``out_proj``'s bias), so nothing downstream can read them either.
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
        kwargs = dict(attention_kwargs or {})
        if getattr(get_attention_class(attention), "token_input", False):
            kwargs.setdefault("model_dim", d_model)  # the core reads the layer's input tokens
        with private_rng():  # the core's own draws leave the global RNG as they found it
            self.attention = create_attention(attention, head_dim=head_dim, num_heads=num_heads, **kwargs)
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
        self_attention = key is None
        key = query if key is None else key
        value = key if value is None else value
        if query.dim() != 3 or key.dim() != 3 or value.dim() != 3 or query.shape[-1] != self.d_model:
            raise ValueError(
                f"expected (B, L, {self.d_model}) inputs, got query {tuple(query.shape)}, "
                f"key {tuple(key.shape)}, value {tuple(value.shape)}"
            )
        k, v = self.project_kv(key, value, key_padding_mask=key_padding_mask)  # (B, H, S, D) each
        if not (self_attention and key_padding_mask is not None):
            return self.attend_projected(query, k, v, key_padding_mask=key_padding_mask, causal=causal)
        # self-attention: the queries are the padded sequence too; keep them out of q_proj's gradient
        query = _zero_padded(query, key_padding_mask)  # (B, L, d_model)
        out = self.attend_projected(query, k, v, key_padding_mask=key_padding_mask, causal=causal)
        return out.masked_fill(key_padding_mask[:, :, None], 0.0)  # (B, L, d_model): padded rows 0

    def project_kv(
        self, key: Tensor, value: Tensor | None = None, *, key_padding_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """(B, S, d_model) keys/values -> heads (B, H, S, D); decoders cache this for cross-attention.

        With ``key_padding_mask`` (B, S) the padded rows are zeroed before projecting, so whatever
        they hold (inf/NaN) reaches no gradient; without it a NaN in a padded row makes the k/v
        weight gradients NaN (0·NaN), even though the core attention ignores that row's output.
        """
        value = key if value is None else value
        if key_padding_mask is not None:
            key, value = _zero_padded(key, key_padding_mask), _zero_padded(value, key_padding_mask)
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
        token = self._token(query)
        out = self.attention(q, k, v, key_padding_mask=key_padding_mask, causal=causal, **token)  # (B, H, L, D)
        return self._merge(out)

    def prefill(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Causal self-attention over a whole prefix x (B, T, d_model): (its output (B, T, d_model), the
        state :meth:`decode_step` continues from at position T), the core's state from its ``prefill``."""
        k, v = self.project_kv(x)  # (B, H, T, D) each
        state = self.attention.prefill(k, v, **self._token(x))
        return self.attend_projected(x, k, v, causal=True), state

    def _token(self, x: Tensor) -> dict[str, Tensor]:
        """``{"x": x}`` for a core that reads the tokens (``token_input``), else nothing."""
        return {"x": x} if self.attention.token_input else {}

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
        out, state = self.attention.decode_step(q, k, v, state, **self._token(x))  # (B, H, 1, D)
        return self._merge(out), state

    def _merge(self, out: Tensor) -> Tensor:
        out = rearrange(out, "b h l d -> b l (h d)")  # (B, L, H·D)
        return self.out_proj(self.dropout(out))  # (B, L, d_model)


def _zero_padded(x: Tensor, key_padding_mask: Tensor) -> Tensor:
    """x (B, S, d) with the rows where ``key_padding_mask`` (B, S) is True set to 0 (gradient 0 there)."""
    if key_padding_mask.dtype != torch.bool or key_padding_mask.shape != x.shape[:2]:
        raise ValueError(
            f"key_padding_mask must be bool of shape (B, S) = {tuple(x.shape[:2])} with True = padding, "
            f"got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)} for input {tuple(x.shape)}"
        )
    return x.masked_fill(key_padding_mask[:, :, None], 0.0)  # (B, S, d)
