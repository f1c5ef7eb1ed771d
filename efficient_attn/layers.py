"""The layers every model of efficient_attn.transformer stacks: :class:`TransformerConfig` (the architecture's
hyper-parameters), :class:`TokenEmbedding` (tokens × √d_model plus sinusoidal or learned positions),
:class:`Block` (self-attention, optional cross-attention, feed-forward, pre- or post-LN) and :class:`Stack` (N
blocks and the final norm), each also run one token at a time (``step``) or over a prefix (``prefill``) with a
:data:`DecodeState`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .multihead import MultiHeadAttention
from .spec import AttentionSpec, layer_specs

DecodeState = dict[str, Any]


@dataclass
class TransformerConfig:
    """Architecture hyper-parameters (Vaswani et al. 2017 names: d_model, h, d_k, d_ff, N)."""

    d_model: int = 256
    num_heads: int = 4
    head_dim: int | None = None  # d_k; None = d_model // num_heads
    d_ff: int = 1024
    encoder_layers: int = 3
    decoder_layers: int = 3
    dropout: float = 0.1
    activation: str = "relu"  # relu | gelu
    norm_first: bool = True  # pre-LN (True) or post-LN as in the paper (False)
    positional: str = "sinusoidal"  # sinusoidal | learned (Table 3 row E)
    max_len: int = 1024
    tie_embeddings: bool = True  # one embedding for source, target and output projection

    def __post_init__(self) -> None:
        for name in ("d_model", "num_heads", "d_ff", "max_len"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be a positive int, got {getattr(self, name)!r}")
        for name in ("encoder_layers", "decoder_layers"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"model.{name} must be an int >= 0, got {getattr(self, name)!r}")
        if self.head_dim is None and self.d_model % self.num_heads:
            raise ValueError(
                f"model.d_model={self.d_model} is not divisible by model.num_heads={self.num_heads}; "
                "change one of them or set model.head_dim (d_k) explicitly"
            )
        if self.head_dim is not None and (not isinstance(self.head_dim, int) or self.head_dim < 1):
            raise ValueError(f"model.head_dim must be a positive int or null, got {self.head_dim!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"model.activation must be one of {sorted(_ACTIVATIONS)}, got {self.activation!r}")
        if self.positional not in ("sinusoidal", "learned"):
            raise ValueError(f"model.positional must be 'sinusoidal' or 'learned', got {self.positional!r}")


_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU}


class TokenEmbedding(nn.Module):
    """Token embedding × √d_model plus sinusoidal or learned positions, then dropout."""

    def __init__(self, vocab_size: int, cfg: TransformerConfig, embedding: nn.Embedding | None = None):
        super().__init__()
        self.tokens = embedding if embedding is not None else nn.Embedding(vocab_size, cfg.d_model)
        if embedding is None:
            nn.init.normal_(self.tokens.weight, std=cfg.d_model**-0.5)
        self.scale = math.sqrt(cfg.d_model)
        self.max_len = cfg.max_len
        if cfg.positional == "learned":
            self.learned = nn.Embedding(cfg.max_len, cfg.d_model)
            nn.init.normal_(self.learned.weight, std=0.02)
        else:
            self.learned = None
            self.register_buffer("table", sinusoid_table(cfg.max_len, cfg.d_model), persistent=False)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, tokens: Tensor, offset: int = 0) -> Tensor:
        length = tokens.shape[1]
        if offset + length > self.max_len:
            raise ValueError(
                f"sequence of length {offset + length} exceeds model.max_len={self.max_len}; "
                "raise model.max_len or shorten the data"
            )
        pos = torch.arange(offset, offset + length, device=tokens.device)  # (T,)
        pe = self.learned(pos) if self.learned is not None else self.table[pos]  # (T, d_model)
        return self.dropout(self.tokens(tokens) * self.scale + pe)  # (B, T, d_model)


def sinusoid_table(length: int, dim: int) -> Tensor:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(...): (length, dim)."""
    pos = torch.arange(length, dtype=torch.float64)[:, None]  # (T, 1)
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return table.float()


class Block(nn.Module):
    """One layer: (causal) self-attention, optional cross-attention, feed-forward; pre- or post-LN."""

    def __init__(
        self,
        cfg: TransformerConfig,
        self_attention: AttentionSpec,
        cross_attention: AttentionSpec | None = None,
        *,
        causal: bool = False,
    ) -> None:
        super().__init__()
        self.causal, self.norm_first = causal, cfg.norm_first

        def mha(spec: AttentionSpec) -> MultiHeadAttention:
            return MultiHeadAttention(
                cfg.d_model, cfg.num_heads, spec.name, spec.kwargs, head_dim=cfg.head_dim, **spec.layer
            )

        self.self_attn = mha(self_attention)
        self.cross_attn = mha(cross_attention) if cross_attention is not None else None
        self.ff = nn.Sequential(
            nn.Linear(cfg.d_model, cfg.d_ff),
            _ACTIVATIONS[cfg.activation](),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.d_ff, cfg.d_model),
        )
        self.norms = nn.ModuleList(nn.LayerNorm(cfg.d_model) for _ in range(3 if cross_attention else 2))
        self.dropout = nn.Dropout(cfg.dropout)

    def _residual(self, i: int, x: Tensor, fn) -> Tensor:
        if self.norm_first:
            return x + self.dropout(fn(self.norms[i](x)))
        return self.norms[i](x + self.dropout(fn(x)))

    def forward(
        self,
        x: Tensor,
        padding_mask: Tensor | None = None,
        memory_kv: tuple[Tensor, Tensor] | None = None,
        memory_mask: Tensor | None = None,
    ) -> Tensor:
        x = self._residual(
            0, x, lambda h: self.self_attn(h, key_padding_mask=padding_mask, causal=self.causal)
        )
        if self.cross_attn is not None:
            k, v = memory_kv  # (B, H, S, D) each
            x = self._residual(
                1, x, lambda h: self.cross_attn.attend_projected(h, k, v, key_padding_mask=memory_mask)
            )
        return self._residual(len(self.norms) - 1, x, self.ff)

    def step(self, x: Tensor, state: DecodeState) -> tuple[Tensor, DecodeState]:
        """x (B, 1, d_model) for the next position; state holds this layer's self-attention state."""
        new: DecodeState = dict(state)

        def self_attend(h: Tensor) -> Tensor:
            out, new["self"] = self.self_attn.decode_step(h, state.get("self"))
            return out

        x = self._residual(0, x, self_attend)
        if self.cross_attn is not None:
            x = self._residual(1, x, lambda h: self.cross_attn.attend_cached(h, state["memory"]))
        return self._residual(len(self.norms) - 1, x, self.ff), new

    def prefill(self, x: Tensor) -> tuple[Tensor, DecodeState]:
        """A causal self-attention layer over a whole prefix x (B, T, d_model): (its output (B, T, d_model),
        the state :meth:`step` continues from at position T), the attention's state from its ``prefill``."""
        if not self.causal or self.cross_attn is not None:
            raise ValueError("prefill is for causal self-attention layers (a decoder-only model)")
        state: DecodeState = {}

        def self_attend(h: Tensor) -> Tensor:
            out, state["self"] = self.self_attn.prefill(h)  # (B, T, d_model)
            return out

        x = self._residual(0, x, self_attend)
        return self._residual(len(self.norms) - 1, x, self.ff), state


class Stack(nn.Module):
    """N blocks plus the final LayerNorm that pre-LN needs.

    ``self_attention``: one spec for every block, or exactly one per block (:func:`layer_specs`);
    the blocks are built in order, so the shared weights are drawn alike whatever each layer's core.
    """

    def __init__(
        self, cfg: TransformerConfig, num_layers: int, self_attention: Any, **block_kwargs: Any
    ) -> None:
        super().__init__()
        site = "decoder" if block_kwargs.get("causal") else "encoder"
        specs = layer_specs(self_attention, num_layers, f"{site} attention", site)
        self.layers = nn.ModuleList(Block(cfg, spec, **block_kwargs) for spec in specs)
        self.final_norm = nn.LayerNorm(cfg.d_model) if cfg.norm_first else nn.Identity()

    def forward(self, x: Tensor, padding_mask: Tensor | None = None, memory=None, memory_mask=None) -> Tensor:
        if padding_mask is not None:  # padded rows (even inf/NaN) reach no output and no gradient
            x = x.masked_fill(padding_mask[:, :, None], 0.0)  # (B, T, d_model)
        for layer in self.layers:
            memory_kv = (
                layer.cross_attn.project_kv(memory, key_padding_mask=memory_mask) if memory is not None else None
            )
            x = layer(x, padding_mask, memory_kv, memory_mask)
        return self.final_norm(x)

    def start(self, memory: Tensor | None = None, memory_mask: Tensor | None = None) -> DecodeState:
        """Decoding state before the first token; cross-attention memory is projected and cached once."""
        layers = []
        for layer in self.layers:
            st: DecodeState = {"self": None}
            if memory is not None:
                k, v = layer.cross_attn.project_kv(memory, key_padding_mask=memory_mask)  # (B, H, S, D) each
                st["memory"] = layer.cross_attn.attention.cache_memory(k, v, memory_mask)
            layers.append(st)
        return {"pos": 0, "layers": layers}

    def step(self, x: Tensor, state: DecodeState) -> tuple[Tensor, DecodeState]:
        layers = []
        for layer, st in zip(self.layers, state["layers"]):
            x, st = layer.step(x, st)
            layers.append(st)
        return self.final_norm(x), {"pos": state["pos"] + 1, "layers": layers}

    def prefill(self, x: Tensor) -> tuple[Tensor, DecodeState]:
        """A whole prefix x (B, T, d_model) at positions 0..T-1 in one pass: (hidden (B, T, d_model), the state
        that T calls of :meth:`step` from :meth:`start` would leave). Self-attention stacks only."""
        layers = []
        for layer in self.layers:
            x, st = layer.prefill(x)
            layers.append(st)
        return self.final_norm(x), {"pos": x.shape[1], "layers": layers}
