"""Multi-head wrapper: the Q/K/V/O projections every variant shares, so comparisons isolate the core."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
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

    Layer options (each off by default; off, the module and its outputs are exactly the plain layer):
    ``short_conv`` K > 0: a causal depthwise convolution over time on each projected q, k, v channel
    (position t sees t−K+1..t, zeros before the start), then SiLU, as flash-linear-attention's
    ``ShortConvolution`` in its GLA/DeltaNet layers (Based, Mamba and zoology's mixers use K = 4);
    no bias. Self-attention only (cross-attention raises). Padded positions' projections are zeroed
    before the convolution, so nothing of theirs (the projection bias included) reaches a real position;
    with left padding the real positions see what the unpadded sequence sees. Decoding keeps the last
    K−1 projected inputs: the state is ``{"core": core state, "conv": (B, K−1, 3·H·D)}``.
    ``output_norm``: ``"rmsnorm"`` (per head over D, a learnable weight (D,) shared by the heads, as fla's
    GLA) or ``"groupnorm"`` (per head mean and variance, learnable weight and bias (H·D,), as RetNet's
    GroupNorm) on the core's output. ``output_gate``: out = out_proj(norm(o) ⊙ swish(x W_g)), W_g
    (d_model → H·D, no bias), as RetNet and GLA. The parameters of these options are drawn after the
    core's, so turning one on leaves the projections as they were.
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
        short_conv: int = 0,
        output_norm: str | None = None,
        output_gate: bool = False,
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
        check_layer_options(short_conv=short_conv, output_norm=output_norm, output_gate=output_gate)
        self.short_conv, self.output_norm = short_conv, output_norm
        if short_conv:  # depthwise: one kernel (K,) per channel of [q | k | v]
            self.conv = nn.Conv1d(3 * inner, 3 * inner, short_conv, groups=3 * inner, bias=False)
        if output_norm == "rmsnorm":
            self.norm_weight = nn.Parameter(torch.ones(head_dim))  # (D,) shared by the heads
        elif output_norm == "groupnorm":
            self.norm_weight = nn.Parameter(torch.ones(inner))  # (H·D,)
            self.norm_bias = nn.Parameter(torch.zeros(inner))  # (H·D,)
        self.gate_proj = nn.Linear(d_model, inner, bias=False) if output_gate else None

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
        if self.short_conv:
            if not self_attention:
                raise ValueError(_CONV_CROSS)
            if key_padding_mask is not None:
                query = _zero_padded(query, key_padding_mask)  # (B, L, d_model)
            q, k, v, _ = self._conv_qkv(query, key_padding_mask)  # (B, H, L, D) each
            out = self.attention(q, k, v, key_padding_mask=key_padding_mask, causal=causal, **self._token(query))
            out = self._merge(out, query)  # (B, L, d_model)
            return out if key_padding_mask is None else out.masked_fill(key_padding_mask[:, :, None], 0.0)
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
        if self.short_conv:
            raise ValueError(_CONV_CROSS)
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
        if self.short_conv:
            raise ValueError(_CONV_CROSS)
        q = rearrange(self.q_proj(query), "b l (h d) -> b h l d", h=self.num_heads)  # (B, H, L, D)
        token = self._token(query)
        out = self.attention(q, k, v, key_padding_mask=key_padding_mask, causal=causal, **token)  # (B, H, L, D)
        return self._merge(out, query)

    def prefill(self, x: Tensor) -> tuple[Tensor, dict[str, Any]]:
        """Causal self-attention over a whole prefix x (B, T, d_model): (its output (B, T, d_model), the
        state :meth:`decode_step` continues from at position T), the core's state from its ``prefill``
        (with ``short_conv``: ``{"core": that, "conv": the last K−1 projected inputs}``)."""
        if self.short_conv:
            q, k, v, window = self._conv_qkv(x)  # (B, H, T, D) each
            state = {"core": self.attention.prefill(k, v, **self._token(x)), "conv": window}
            out = self.attention(q, k, v, causal=True, **self._token(x))  # (B, H, T, D)
            return self._merge(out, x), state
        k, v = self.project_kv(x)  # (B, H, T, D) each
        state = self.attention.prefill(k, v, **self._token(x))
        return self.attend_projected(x, k, v, causal=True), state

    def _conv_qkv(
        self, x: Tensor, key_padding_mask: Tensor | None = None, window: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """q, k, v (B, H, L, D) of x (B, L, d_model) through the short convolution, and its new window.

        ``window`` (B, K−1, 3·H·D): the projected inputs of the K−1 positions before x (None: zeros,
        the sequence start); the returned window is the last K−1 of [window | projections of x].
        """
        proj = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)  # (B, L, 3·H·D)
        if key_padding_mask is not None:
            proj = _zero_padded(proj, key_padding_mask)  # no projection bias from a padded position
        width = self.short_conv - 1
        if window is None:
            window = proj.new_zeros(proj.shape[0], width, proj.shape[-1])  # (B, K−1, 3·H·D)
        full = torch.cat([window.to(proj.dtype), proj], dim=1)  # (B, K−1+L, 3·H·D)
        mixed = F.conv1d(full.transpose(1, 2), self.conv.weight.to(proj.dtype), groups=proj.shape[-1])
        mixed = F.silu(mixed.transpose(1, 2))  # (B, L, 3·H·D)
        q, k, v = rearrange(mixed, "b l (three h d) -> three b h l d", three=3, h=self.num_heads)
        return q, k, v, full[:, full.shape[1] - width :]  # (B, H, L, D) ×3, (B, K−1, 3·H·D)

    def _token(self, x: Tensor) -> dict[str, Tensor]:
        """``{"x": x}`` for a core that reads the tokens (``token_input``), else nothing."""
        return {"x": x} if self.attention.token_input else {}

    def attend_cached(self, query: Tensor, memory: dict[str, Tensor | None]) -> Tensor:
        """Queries (B, L, d_model) against ``attention.cache_memory(*project_kv(memory))``."""
        if self.short_conv:
            raise ValueError(_CONV_CROSS)
        q = rearrange(self.q_proj(query), "b l (h d) -> b h l d", h=self.num_heads)  # (B, H, L, D)
        return self._merge(self.attention.attend_memory(q, memory), query)

    def decode_step(
        self, x: Tensor, state: dict[str, Tensor] | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Causal self-attention for one new position: x (B, 1, d_model) -> ((B, 1, d_model), state).

        The state is the core attention's (a key/value cache, or a running sum for kernelized
        variants); every tensor in it has the batch first, so beam search can reorder it. With
        ``short_conv`` it is ``{"core": the core's state, "conv": (B, K−1, 3·H·D) last projected inputs}``.
        """
        if x.dim() != 3 or x.shape[1] != 1 or x.shape[-1] != self.d_model:
            raise ValueError(f"decode_step expects (B, 1, {self.d_model}), got {tuple(x.shape)}")
        if self.short_conv:
            state = state or {}
            q, k, v, window = self._conv_qkv(x, window=state.get("conv"))  # (B, H, 1, D) each
            out, core = self.attention.decode_step(q, k, v, state.get("core"), **self._token(x))  # (B, H, 1, D)
            return self._merge(out, x), {"core": core, "conv": window}
        q = rearrange(self.q_proj(x), "b l (h d) -> b h l d", h=self.num_heads)  # (B, H, 1, D)
        k, v = self.project_kv(x)  # (B, H, 1, D) each
        out, state = self.attention.decode_step(q, k, v, state, **self._token(x))  # (B, H, 1, D)
        return self._merge(out, x), state

    def _merge(self, out: Tensor, x: Tensor) -> Tensor:
        """Heads (B, H, L, D) -> (B, L, d_model): output norm, gate from the queries' tokens x, out_proj."""
        if self.output_norm == "rmsnorm":
            out = out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + _EPS) * self.norm_weight  # (B, H, L, D)
        elif self.output_norm == "groupnorm":
            mean, var = out.mean(-1, keepdim=True), out.var(-1, unbiased=False, keepdim=True)  # (B, H, L, 1)
            out = (out - mean) * torch.rsqrt(var + _EPS)  # (B, H, L, D)
        out = rearrange(out, "b h l d -> b l (h d)")  # (B, L, H·D)
        if self.output_norm == "groupnorm":
            out = out * self.norm_weight + self.norm_bias  # (B, L, H·D)
        if self.gate_proj is not None:
            out = out * F.silu(self.gate_proj(x))  # (B, L, H·D)
        return self.out_proj(self.dropout(out))  # (B, L, d_model)

    def extra_repr(self) -> str:
        options = [f"short_conv={self.short_conv}"] if self.short_conv else []
        options += [f"output_norm={self.output_norm}"] if self.output_norm else []
        options += ["output_gate=True"] if self.gate_proj is not None else []
        return ", ".join(options)


_EPS = 1e-5  # the output norms' ε (nn.GroupNorm's)
_CONV_CROSS = ("short_conv is for self-attention only: it convolves each position's own q, k, v over time, "
               "which keys from another sequence (cross-attention, attend_projected, attend_cached) do not have")
LAYER_OPTIONS = ("short_conv", "output_norm", "output_gate")
OUTPUT_NORMS = (None, "rmsnorm", "groupnorm")


def check_layer_options(**options: Any) -> None:
    """``ValueError`` naming the option when a layer option is unknown or has a bad value."""
    unknown = sorted(set(options) - set(LAYER_OPTIONS))
    if unknown:
        raise ValueError(f"unknown layer option(s) {unknown}; the layer options are {list(LAYER_OPTIONS)}")
    conv = options.get("short_conv", 0)
    if not isinstance(conv, int) or isinstance(conv, bool) or conv < 0:
        raise ValueError(f"short_conv must be an int >= 0 (0 = off; the kernel size, e.g. 4), got {conv!r}")
    if options.get("output_norm") not in OUTPUT_NORMS:
        raise ValueError(f"output_norm must be one of {list(OUTPUT_NORMS)}, got {options.get('output_norm')!r}")
    if not isinstance(options.get("output_gate", False), bool):
        raise ValueError(f"output_gate must be a bool, got {options.get('output_gate')!r}")


def _zero_padded(x: Tensor, key_padding_mask: Tensor) -> Tensor:
    """x (B, S, d) with the rows where ``key_padding_mask`` (B, S) is True set to 0 (gradient 0 there)."""
    if key_padding_mask.dtype != torch.bool or key_padding_mask.shape != x.shape[:2]:
        raise ValueError(
            f"key_padding_mask must be bool of shape (B, S) = {tuple(x.shape[:2])} with True = padding, "
            f"got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)} for input {tuple(x.shape)}"
        )
    return x.masked_fill(key_padding_mask[:, :, None], 0.0)  # (B, S, d)
