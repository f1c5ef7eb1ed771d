"""Greedy and beam search over any model with ``start`` / ``decode_step`` (incremental decoding).

A model's ``start(...)`` returns a decoding state and ``decode_step(tokens (B,), state)`` returns
(logits (B, V), state). Every tensor in the state is batch-first, so beams are reordered by index.
Outputs are (B, T) token ids without BOS, ending at EOS and padded with ``pad`` after it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .transformer import reorder_state

_SHARED = ("memory",)  # cross-attention memory: identical for every beam of one sentence, never reordered


@torch.no_grad()
def greedy_search(model: Any, state: Any, batch_size: int, *, bos: int, eos: int, pad: int, max_len: int) -> Tensor:
    """Pick the most likely token at each step until every row has produced EOS or ``max_len``."""
    device = _device(model)
    tokens = torch.full((batch_size,), bos, dtype=torch.long, device=device)  # (B,)
    done = torch.zeros(batch_size, dtype=torch.bool, device=device)  # (B,)
    out = []
    for _ in range(max_len):
        logits, state = model.decode_step(tokens, state)  # (B, V)
        tokens = logits.argmax(-1).masked_fill(done, pad)  # (B,)
        out.append(tokens)
        done |= tokens == eos
        if bool(done.all()):
            break
    return torch.stack(out, dim=1) if out else torch.empty(batch_size, 0, dtype=torch.long, device=device)


@torch.no_grad()
def beam_search(
    model: Any,
    state: Any,
    batch_size: int,
    *,
    bos: int,
    eos: int,
    pad: int,
    max_len: int,
    beam_size: int = 4,
    length_penalty: float = 0.6,
) -> Tensor:
    """Beam search; the final pick divides log-probabilities by ((5 + |y|) / 6)^α (Wu et al. 2016).

    ``state`` is the model's state for ``batch_size`` rows; it is expanded to beam_size rows each.
    Finished beams continue with ``pad`` at no cost, so they keep their score and slot.
    """
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    device, k = _device(model), beam_size
    rows = torch.arange(batch_size, device=device)
    state = reorder_state(state, rows.repeat_interleave(k))  # every tensor (B·K, ...)
    scores = torch.zeros(batch_size, k, device=device)  # (B, K) summed log-probabilities
    scores[:, 1:] = float("-inf")  # all beams start identical: keep one
    tokens = torch.full((batch_size * k,), bos, dtype=torch.long, device=device)  # (B·K,)
    history = torch.empty(batch_size * k, 0, dtype=torch.long, device=device)  # (B·K, t)
    finished = torch.zeros(batch_size * k, dtype=torch.bool, device=device)  # (B·K,)
    lengths = torch.zeros(batch_size * k, device=device)  # (B·K,) tokens up to and including EOS
    for _ in range(max_len):
        logits, state = model.decode_step(tokens, state)  # (B·K, V)
        logp = torch.log_softmax(logits.float(), dim=-1)  # (B·K, V)
        vocab = logp.shape[-1]
        logp[finished] = float("-inf")
        logp[finished, pad] = 0.0
        cand = (scores.reshape(-1, 1) + logp).reshape(batch_size, k * vocab)  # (B, K·V)
        scores, best = cand.topk(k, dim=1)  # (B, K)
        src = (rows[:, None] * k + best // vocab).reshape(-1)  # (B·K,) parent beam of each slot
        tokens = (best % vocab).reshape(-1)  # (B·K,)
        state = _reorder_beams(state, src)
        history = torch.cat([history[src], tokens[:, None]], dim=1)  # (B·K, t+1)
        lengths = lengths[src] + (~finished[src]).float()
        finished = finished[src] | (tokens == eos)
        if bool(finished.all()):
            break
    normalized = scores / ((5.0 + lengths.reshape(batch_size, k)) / 6.0) ** length_penalty  # (B, K)
    pick = rows * k + normalized.argmax(dim=1)  # (B,)
    return history[pick]


def _reorder_beams(state: Any, index: Tensor) -> Any:
    if isinstance(state, dict):
        return {key: value if key in _SHARED else _reorder_beams(value, index) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_reorder_beams(value, index) for value in state)
    return reorder_state(state, index)


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


__all__ = ["beam_search", "greedy_search"]
