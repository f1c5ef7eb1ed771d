"""Greedy and beam search over any model with ``start`` / ``decode_step`` (incremental decoding), and
sampled continuation of a prompt for a language model with ``prefill`` / ``decode_step``.

A model's ``start(...)`` returns a decoding state and ``decode_step(tokens (B,), state)`` returns
(logits (B, V), state). Every tensor in the state is batch-first, so beams are reordered by index.
Outputs are (B, T) token ids without BOS, ending at EOS and padded with ``pad`` after it.

Both searches mask, at every step, the special tokens a hypothesis may never emit (``bos``, ``pad``
and ``unk`` when given) and EOS before ``min_len`` tokens; scores are the model's log-probabilities
of the emitted tokens (masking does not renormalize), as in fairseq and Hugging Face.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .transformer import reorder_state

_SHARED = ("memory",)  # cross-attention memory: identical for every beam of one sentence, never reordered
_NEG_INF = float("-inf")


@torch.no_grad()
def greedy_search(model: Any, state: Any, batch_size: int, *, bos: int, eos: int, pad: int, max_len: int,
                  min_len: int = 0, unk: int | None = None) -> Tensor:
    """Pick the most likely allowed token at each step until every row has produced EOS or ``max_len``.

    ``min_len``: EOS is masked while fewer than ``min_len`` tokens have been generated (fairseq's
    ``--min-len``, HF's ``min_new_tokens``), so a row has at least ``min_len`` tokens before EOS.
    """
    device, banned = _device(model), _banned(bos, pad, unk)
    tokens = torch.full((batch_size,), bos, dtype=torch.long, device=device)  # (B,)
    done = torch.zeros(batch_size, dtype=torch.bool, device=device)  # (B,)
    out = []
    for step in range(max_len):
        logp, state = _next_logprobs(model, tokens, state, banned, eos if step < min_len else None)  # (B, V)
        tokens = logp.argmax(-1).masked_fill(done, pad)  # (B,)
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
    min_len: int = 0,
    unk: int | None = None,
) -> Tensor:
    """Standard beam search (fairseq ``fairseq/sequence_generator.py``, Hugging Face
    ``transformers/generation/beam_search.py`` ``BeamSearchScorer``).

    Each step, every sentence's K = ``beam_size`` live hypotheses are extended and the best 2K
    candidates kept; a candidate ending in EOS among the best K is set aside as finished, scored
    ``sum log p / |y|**α`` (α = ``length_penalty``; |y| = generated tokens including EOS, without
    BOS: HF ``BeamHypotheses.add`` divides by ``hyp.shape[-1]``, BOS included and EOS not yet
    appended, fairseq ``finalize_hypos`` by ``(step + 1) ** len_penalty``: the same count); the
    best K others stay live, so there are always K live hypotheses. At ``max_len`` the live ones are finalized
    with the same penalty (no EOS). The best finished hypothesis of each sentence is returned.

    Stopping is exact (HF's ``early_stopping="never"``, not its default heuristic): a sentence is
    done when no live hypothesis can beat its best finished one, since a live sum s <= 0 can only
    fall and its length only grow, so s / L**α is bounded by L = ``max_len`` (α > 0) or the next
    length (α <= 0). So the result equals running to ``max_len``. ``beam_size=1`` is greedy search
    (as HF dispatches ``num_beams=1``); ``min_len`` and the masked tokens are as in ``greedy_search``.
    """
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    kw = dict(bos=bos, eos=eos, pad=pad, max_len=max_len, min_len=min_len, unk=unk)
    if beam_size == 1:
        return greedy_search(model, state, batch_size, **kw)
    return _beam(model, state, batch_size, beam_size=beam_size, alpha=length_penalty, **kw)


def _beam(model: Any, state: Any, batch_size: int, *, bos: int, eos: int, pad: int, max_len: int, min_len: int,
          unk: int | None, beam_size: int, alpha: float) -> Tensor:
    """The beam search of ``beam_search`` for any K >= 1 (K = 1 with α = 0 is greedy search)."""
    device, k, banned = _device(model), beam_size, _banned(bos, pad, unk)
    rows = torch.arange(batch_size, device=device)
    state = reorder_state(state, rows.repeat_interleave(k))  # every tensor (B·K, ...)
    scores = torch.zeros(batch_size, k, dtype=torch.float64, device=device)  # (B, K) live sums of log-probabilities
    scores[:, 1:] = _NEG_INF  # all beams start identical: keep one
    tokens = torch.full((batch_size * k,), bos, dtype=torch.long, device=device)  # (B·K,)
    history = torch.empty(batch_size, k, 0, dtype=torch.long, device=device)  # (B, K, t)
    best = _Finished(batch_size, max_len, pad, device)
    for step in range(max_len):
        logp, state = _next_logprobs(model, tokens, state, banned, eos if step < min_len else None)  # (B·K, V)
        top, parent, token = _top_candidates(scores, logp.reshape(batch_size, k, -1), 2 * k)  # (B, 2K) each
        ends = (token == eos) & (torch.arange(top.shape[1], device=device) < k)  # (B, 2K) EOS among the best K
        grown = torch.cat([_gather(history, parent), token[..., None]], dim=2)  # (B, 2K, t+1)
        best.offer(torch.where(ends, top / (step + 1) ** alpha, _NEG_INF), grown)
        keep = torch.sort((token == eos).to(torch.uint8), dim=1, stable=True).indices[:, :k]  # (B, K) best non-EOS
        scores, parent, history = top.gather(1, keep), parent.gather(1, keep), _gather(grown, keep)
        tokens = history[:, :, -1].reshape(-1)  # (B·K,)
        state = _reorder_beams(state, (rows[:, None] * k + parent).reshape(-1))
        if bool((best.score >= _bound(scores, step + 1, max_len, alpha)).all()):
            break
    else:
        best.offer(scores / max(max_len, 1) ** alpha, history)  # max_len reached: finalize the live beams
    return best.tokens[:, : int(best.length.max()) if batch_size else 0]


@torch.no_grad()
def sample(model: Any, prompt: Tensor, max_new_tokens: int, *, temperature: float = 1.0, top_k: int = 0,
           generator: torch.Generator | None = None) -> Tensor:
    """Continue each row of ``prompt`` (B, T) token ids by ``max_new_tokens`` tokens: (B, max_new_tokens).

    The prompt is read in one ``model.prefill`` call; every new token then costs one ``decode_step`` on
    the model's incremental state (constant-size for kernel attentions, a growing key/value cache for
    softmax). Each token is drawn from softmax(logits / ``temperature``) restricted to the ``top_k`` most
    likely tokens (0: all of them); ``temperature=0`` takes the most likely token (greedy). ``generator``
    makes the draws reproducible.
    """
    if max_new_tokens < 0 or temperature < 0 or top_k < 0:
        raise ValueError(f"max_new_tokens, temperature and top_k must be >= 0, got {max_new_tokens}, "
                         f"{temperature}, {top_k}")
    logits, state = model.prefill(prompt)  # (B, V)
    out = []
    for i in range(max_new_tokens):
        out.append(_draw(logits, temperature, top_k, generator))  # (B,)
        if i + 1 < max_new_tokens:
            logits, state = model.decode_step(out[-1], state)
    return torch.stack(out, dim=1) if out else prompt.new_empty(prompt.shape[0], 0)


def _draw(logits: Tensor, temperature: float, top_k: int, generator: torch.Generator | None) -> Tensor:
    """One token per row of ``logits`` (B, V): the argmax at temperature 0, else a draw (B,)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, _NEG_INF)
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)[:, 0]


class _Finished:
    """Per sentence, the best finished hypothesis so far: normalized score (B,), tokens (B, max_len), length (B,)."""

    def __init__(self, batch_size: int, max_len: int, pad: int, device: torch.device) -> None:
        self.score = torch.full((batch_size,), _NEG_INF, dtype=torch.float64, device=device)
        self.tokens = torch.full((batch_size, max_len), pad, dtype=torch.long, device=device)
        self.length = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.pad = pad

    def offer(self, scores: Tensor, hyps: Tensor) -> None:
        """Keep each sentence's best of ``hyps`` (B, N, t) by normalized ``scores`` (B, N) if it beats the kept one."""
        top, arg = scores.max(dim=1)  # (B,)
        better = top > self.score  # strictly: an earlier (shorter or higher-ranked) hypothesis wins ties
        if not bool(better.any()):
            return
        t = hyps.shape[2]
        picked = hyps[torch.arange(hyps.shape[0], device=hyps.device), arg]  # (B, t)
        self.tokens[better] = torch.nn.functional.pad(picked[better], (0, self.tokens.shape[1] - t), value=self.pad)
        self.length[better] = t
        self.score = torch.where(better, top, self.score)


def _top_candidates(scores: Tensor, logp: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """The best ``n`` one-token extensions of the live beams: (sum, parent beam, token), each (B, n), best first."""
    batch_size, k, vocab = logp.shape
    cand = (scores[..., None] + logp).reshape(batch_size, k * vocab)  # (B, K·V)
    top, index = cand.topk(min(n, k * vocab), dim=1)  # (B, n)
    return top, index // vocab, index % vocab


def _bound(live: Tensor, length: int, max_len: int, alpha: float) -> Tensor:
    """The best normalized score any continuation of the live beams (sums (B, K), ``length`` tokens) can reach, (B,)."""
    # a live sum s <= 0 only falls and ends at a length L in [length + 1, max_len] (= max_len when finalized
    # there): s / L**α is largest at L = max_len for α > 0, at the shortest L for α <= 0
    final_len = max_len if alpha > 0 else min(length + 1, max_len)
    return live.max(dim=1).values / final_len**alpha


def _next_logprobs(model: Any, tokens: Tensor, state: Any, banned: list[int], eos: int | None) -> tuple[Tensor, Any]:
    """One decoding step: log-probabilities (N, V), at least float32, with ``banned`` (and ``eos`` if given) at -inf."""
    logits, state = model.decode_step(tokens, state)  # (N, V)
    logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)  # (N, V)
    logp[:, banned + ([eos] if eos is not None else [])] = _NEG_INF
    return logp, state


def _banned(bos: int, pad: int, unk: int | None) -> list[int]:
    """Special tokens no hypothesis may emit: BOS, PAD and, when the vocabulary has one, UNK."""
    return [bos, pad] + ([unk] if unk is not None else [])


def _gather(x: Tensor, index: Tensor) -> Tensor:
    """Rows of ``x`` (B, K, t) picked per sentence by ``index`` (B, N): (B, N, t)."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[2]))


def _reorder_beams(state: Any, index: Tensor) -> Any:
    if isinstance(state, dict):
        return {key: value if key in _SHARED else _reorder_beams(value, index) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_reorder_beams(value, index) for value in state)
    return reorder_state(state, index)


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


__all__ = ["beam_search", "greedy_search", "sample"]
