"""A plain-PyTorch Transformer whose every attention site takes a registered attention by name.

Three models share one layer stack (efficient_attn/layers.py): :class:`Seq2SeqTransformer` (encoder–decoder,
translation), :class:`TransformerClassifier` (encoder only, e.g. ListOps) and :class:`TransformerLM`
(decoder only). Token tensors are (B, T) int64; padding masks are (B, T) bool with True = padding.
Every parameter outside the core attentions comes from torch's global RNG in the same order
whatever the attentions, so one seed gives the same embeddings, projections and feed-forwards for
every variant; each core attention draws from its own stream (``efficient_attn.seed_attentions``).
Decoders also run one token at a time (``decode_step``): O(1) per token in the prefix for
kernelized attentions (running sums), a key/value cache for the quadratic ones; the language
model reads a whole prompt into that state in one pass (``prefill``).

Self-attention sites take one :class:`AttentionSpec` (every layer) or a sequence of exactly one
per layer (a hybrid such as Based: sliding-window and Taylor linear-attention layers); every layer
is checked for its site (efficient_attn/spec.py), and decoding steps each layer with its own state.
The specs and layers are importable from here too.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from .layers import Block as Block
from .layers import DecodeState, Stack, TokenEmbedding, TransformerConfig, sinusoid_table
from .seeding import seed_attentions
from .spec import SITE_USE, AttentionSpec, layer_specs


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
