"""A plain-PyTorch Transformer whose every attention site takes a registered attention by name.

Three models share one layer stack: :class:`Seq2SeqTransformer` (encoder–decoder, translation),
:class:`TransformerClassifier` (encoder only, e.g. ListOps) and :class:`TransformerLM`
(decoder only). Token tensors are (B, T) int64; padding masks are (B, T) bool with True = padding.
Every parameter outside the core attentions comes from torch's global RNG in the same order
whatever the attentions, so one seed gives the same embeddings, projections and feed-forwards for
every variant; each core attention draws from its own stream (``efficient_attn.seed_attentions``).
Decoders also run one token at a time (``decode_step``): O(1) per token in the prefix for
kernelized attentions (running sums), a key/value cache for the quadratic ones; the language
model reads a whole prompt into that state in one pass (``prefill``).

Self-attention sites take one :class:`AttentionSpec` (every layer) or a sequence of exactly one
per layer (a hybrid such as Based: sliding-window and Taylor linear-attention layers); every layer
is checked for its site, and decoding steps each layer with its own state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from .attention.base import unsupported_use
from .multihead import MultiHeadAttention, check_layer_options
from .registry import attention_options, get_attention_class
from .seeding import seed_attentions

DecodeState = dict[str, Any]

# How each attention site calls its core: decoder self-attention is causal; cross-attention reads
# another sequence (S ≠ L). Variants that cannot serve a site (``Attention.supports_*``) are refused.
SITE_USE = {
    "encoder": {"causal": False, "cross": False},
    "decoder": {"causal": True, "cross": False},
    "cross": {"causal": False, "cross": True},
}


@dataclass
class AttentionSpec:
    """Which registered attention an attention site uses, its options (``kwargs``, the core's) and its
    layer options (``layer``: :class:`~efficient_attn.multihead.MultiHeadAttention`'s ``short_conv``,
    ``output_norm``, ``output_gate``; empty = the plain layer)."""

    name: str = "softmax"
    kwargs: dict[str, Any] = field(default_factory=dict)
    layer: dict[str, Any] = field(default_factory=dict)

    def check(self, where: str, site: str | None = None) -> None:
        """Name and options exist; with ``site`` (a :data:`SITE_USE` key) the attention can also serve
        there (a causal-only variant is no encoder), else ``ValueError`` naming the site."""
        try:
            cls = get_attention_class(self.name)  # ValueError naming the known attentions
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        unknown = sorted(set(self.kwargs) - set(attention_options(self.name)))
        if unknown:
            raise TypeError(
                f"{where}: attention {self.name!r} has no option(s) {unknown}; "
                f"accepted: {attention_options(self.name)}"
            )
        try:
            check_layer_options(**self.layer)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        problem = None if site is None else unsupported_use(cls, **SITE_USE[site])
        if site is not None and SITE_USE[site]["cross"] and self.layer.get("short_conv"):
            problem = ("short_conv is for self-attention only (it convolves each position's own q, k, v); "
                       "set layer.short_conv: 0 for cross-attention")
        if problem:
            raise ValueError(f"{where}: attention {self.name!r} cannot serve as {site} attention: {problem}")


def layer_specs(attention: Any, num_layers: int, where: str, site: str) -> list[AttentionSpec]:
    """One spec per layer of a stack, each checked for ``site`` (a :data:`SITE_USE` key).

    ``attention`` is one :class:`AttentionSpec` (every layer) or a sequence of exactly ``num_layers``
    (layer i uses entry i; no repetition: a Based-style pattern is tiled by the caller). A wrong
    length, or a layer whose attention cannot serve ``site``, is a ``ValueError`` naming the layer.
    """
    if isinstance(attention, AttentionSpec):
        attention.check(where, site)
        return [attention] * num_layers
    if isinstance(attention, (str, bytes)) or not isinstance(attention, Sequence):
        raise TypeError(f"{where}: expected an AttentionSpec or a sequence of them, got {attention!r}")
    specs = list(attention)
    if len(specs) != num_layers:
        raise ValueError(
            f"{where}: {len(specs)} per-layer attention(s) for {num_layers} layer(s); give one AttentionSpec "
            f"(every layer) or exactly one per layer"
        )
    for i, spec in enumerate(specs):
        if not isinstance(spec, AttentionSpec):
            raise TypeError(f"{where}, layer {i}: expected an AttentionSpec, got {spec!r}")
        spec.check(f"{where}, layer {i}", site)
    return specs


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


def reorder_state(state: Any, index: Tensor) -> Any:
    """Select batch rows of every tensor in a decoding state (beam search): tensors are batch-first."""
    if isinstance(state, Tensor):
        return state.index_select(0, index)
    if isinstance(state, dict):
        return {key: reorder_state(value, index) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(reorder_state(value, index) for value in state)
    return state


class _Decoding:
    """Shared next-token machinery: embed, run the decoder stack, project to the vocabulary."""

    embed_tgt: TokenEmbedding
    decoder: Stack
    output: nn.Linear

    def logits(self, hidden: Tensor) -> Tensor:
        return self.output(hidden)  # (B, T, V)

    def decode_step(self, tokens: Tensor, state: DecodeState) -> tuple[Tensor, DecodeState]:
        """tokens (B,) at position state["pos"] -> (logits (B, V), next state)."""
        x = self.embed_tgt(tokens[:, None], offset=state["pos"])  # (B, 1, d_model)
        hidden, state = self.decoder.step(x, state)  # (B, 1, d_model)
        return self.logits(hidden)[:, 0], state


def _output_layer(cfg: TransformerConfig, vocab_size: int, embedding: nn.Embedding) -> nn.Linear:
    output = nn.Linear(cfg.d_model, vocab_size, bias=False)
    if cfg.tie_embeddings:
        output.weight = embedding.weight
    return output


class Seq2SeqTransformer(_Decoding, nn.Module):
    """Encoder–decoder (Vaswani et al. 2017). With ``tie_embeddings`` the source, target and output
    embeddings are one matrix (joint vocabulary), else three. ``encoder_attention`` /
    ``decoder_attention``: one spec or one per layer; ``cross_attention``: one spec (every layer)."""

    def __init__(
        self,
        cfg: TransformerConfig,
        vocab_size: int,
        *,
        encoder_attention: AttentionSpec | Sequence[AttentionSpec],
        decoder_attention: AttentionSpec | Sequence[AttentionSpec],
        cross_attention: AttentionSpec,
    ) -> None:
        super().__init__()
        layer_specs(encoder_attention, cfg.encoder_layers, "encoder attention", "encoder")
        layer_specs(decoder_attention, cfg.decoder_layers, "decoder attention", "decoder")
        cross_attention.check("cross attention", "cross")
        self.cfg = cfg
        self.embed_src = TokenEmbedding(vocab_size, cfg)
        shared = self.embed_src.tokens if cfg.tie_embeddings else None
        self.embed_tgt = TokenEmbedding(vocab_size, cfg, embedding=shared)
        self.encoder = Stack(cfg, cfg.encoder_layers, self_attention=encoder_attention)
        self.decoder = Stack(
            cfg, cfg.decoder_layers, self_attention=decoder_attention, cross_attention=cross_attention, causal=True
        )
        self.output = _output_layer(cfg, vocab_size, self.embed_tgt.tokens)
        seed_attentions(self)  # each attention its own stream from (torch.initial_seed(), its name)

    def encode(self, src: Tensor, src_mask: Tensor | None = None) -> Tensor:
        return self.encoder(self.embed_src(src), src_mask)  # (B, S, d_model)

    def forward(
        self, src: Tensor, tgt_in: Tensor, src_mask: Tensor | None = None, tgt_mask: Tensor | None = None
    ) -> Tensor:
        """Teacher forcing: src (B, S), tgt_in (B, T) -> logits (B, T, V)."""
        memory = self.encode(src, src_mask)  # (B, S, d_model)
        hidden = self.decoder(self.embed_tgt(tgt_in), tgt_mask, memory, src_mask)  # (B, T, d_model)
        return self.logits(hidden)

    def start(self, src: Tensor, src_mask: Tensor | None = None) -> DecodeState:
        """Encode once and return the state for :meth:`decode_step`."""
        return self.decoder.start(self.encode(src, src_mask), src_mask)


class TransformerLM(_Decoding, nn.Module):
    """Decoder-only causal language model: tokens (B, T) -> next-token logits (B, T, V).
    ``attention``: one spec for every layer, or exactly one per layer (``cfg.decoder_layers``)."""

    def __init__(
        self, cfg: TransformerConfig, vocab_size: int, *, attention: AttentionSpec | Sequence[AttentionSpec]
    ) -> None:
        super().__init__()
        layer_specs(attention, cfg.decoder_layers, "decoder attention", "decoder")
        self.cfg = cfg
        self.embed_tgt = TokenEmbedding(vocab_size, cfg)
        self.decoder = Stack(cfg, cfg.decoder_layers, self_attention=attention, causal=True)
        self.output = _output_layer(cfg, vocab_size, self.embed_tgt.tokens)
        seed_attentions(self)  # each attention its own stream from (torch.initial_seed(), its name)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.logits(self.decoder(self.embed_tgt(tokens)))  # (B, T, V)

    def start(self) -> DecodeState:
        """State before the first token (every layer's self-attention state is empty)."""
        return self.decoder.start()

    def prefill(self, tokens: Tensor) -> tuple[Tensor, DecodeState]:
        """Read a prompt (B, T), T >= 1, in one pass: (next-token logits (B, V) after it, the state
        :meth:`decode_step` continues from), as T decode steps from :meth:`start` would give, with each
        attention's ``prefill`` (a running sum for kernel attentions, a key/value cache otherwise)."""
        if tokens.dim() != 2 or tokens.shape[1] < 1:
            raise ValueError(f"prefill expects a (B, T) prompt with T >= 1, got {tuple(tokens.shape)}")
        hidden, state = self.decoder.prefill(self.embed_tgt(tokens))  # (B, T, d_model)
        return self.logits(hidden[:, -1]), state


class TransformerClassifier(nn.Module):
    """Encoder with mean (over non-padding) or first-token pooling and a linear head: (B, T) -> (B, C).
    ``attention``: one spec for every layer, or exactly one per layer (``cfg.encoder_layers``)."""

    def __init__(
        self, cfg: TransformerConfig, vocab_size: int, num_classes: int, *,
        attention: AttentionSpec | Sequence[AttentionSpec], pooling: str = "mean",
    ) -> None:
        super().__init__()
        layer_specs(attention, cfg.encoder_layers, "encoder attention", "encoder")
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        self.cfg, self.pooling = cfg, pooling
        self.embed = TokenEmbedding(vocab_size, cfg)
        self.encoder = Stack(cfg, cfg.encoder_layers, self_attention=attention)
        self.head = nn.Linear(cfg.d_model, num_classes)
        seed_attentions(self)  # each attention its own stream from (torch.initial_seed(), its name)

    def forward(self, tokens: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        hidden = self.encoder(self.embed(tokens), padding_mask)  # (B, T, d_model)
        if self.pooling == "cls":
            return self.head(hidden[:, 0])  # (B, C)
        keep = torch.ones_like(tokens, dtype=hidden.dtype) if padding_mask is None else (~padding_mask).to(hidden.dtype)
        pooled = (hidden * keep[..., None]).sum(1) / keep.sum(1, keepdim=True).clamp_min(1.0)  # (B, d_model)
        return self.head(pooled)  # (B, C)


@torch.no_grad()
def decode_state_size(model: "TransformerLM", seq_len: int, layer: int | None = None) -> float:
    """Numbers one decoder layer keeps per sequence after decoding ``seq_len`` tokens (its
    self-attention state, measured by stepping a batch of one): a KV cache is 2·L·d_model, a
    kernel attention's running sum H·M·(D+1) plus its normaliser terms, whatever L.

    ``layer`` None: the mean over the decoder's layers (any layer's size when all use one attention;
    a hybrid's average per layer, e.g. a sliding window's w-bounded cache and a running sum); an int:
    that layer's. An int when it is whole, else a float.
    """
    device = next(model.parameters()).device
    state, token = model.start(), torch.zeros(1, dtype=torch.long, device=device)  # (1,)
    for _ in range(seq_len):
        _, state = model.decode_step(token, state)
    sizes = [sum(t.numel() for t in _tensors(st["self"])) for st in state["layers"]]
    if layer is not None:
        return sizes[layer]
    total, n = sum(sizes), max(len(sizes), 1)
    return total // n if total % n == 0 else total / n


def _tensors(tree: Any) -> list[Tensor]:
    if isinstance(tree, Tensor):
        return [tree]
    if isinstance(tree, dict):
        tree = list(tree.values())
    return [t for item in tree or () for t in _tensors(item)] if isinstance(tree, (list, tuple)) else []


def count_parameters(module: nn.Module) -> int:
    """Trainable parameters, each shared tensor counted once."""
    seen = {id(p): p for p in module.parameters() if p.requires_grad}
    return sum(p.numel() for p in seen.values())


__all__ = [
    "SITE_USE",
    "AttentionSpec",
    "Seq2SeqTransformer",
    "TransformerClassifier",
    "TransformerConfig",
    "TransformerLM",
    "count_parameters",
    "decode_state_size",
    "layer_specs",
    "reorder_state",
    "sinusoid_table",
]
