"""Beam search against exhaustive search on tiny vocabularies, where beam = exhaustive by construction.

The toy "models" are tables: the next-token log-probabilities are a function of the prefix (given
per prefix, or seeded random logits for prefixes not listed), one table per sentence of the batch.
Exhaustive search scores every sequence the same way as the beam (sum log p / |y|**α, |y| tokens
including EOS; a sequence that reaches ``max_len`` without EOS is scored as it stands), with the
same masks (PAD, BOS, UNK never; EOS not before ``min_len``).
"""

from __future__ import annotations

import zlib

import pytest
import torch
from torch import Tensor, nn

from efficient_attn.generate import _beam, beam_search, greedy_search

PAD, BOS, EOS, UNK, B, X = range(6)  # the toy vocabulary: pad, bos, eos, unk, 'b', 'x'
VOCAB = 6
SPECIAL = (PAD, BOS, UNK)
KW = dict(bos=BOS, eos=EOS, pad=PAD, unk=UNK)


class TableModel(nn.Module):
    """Logits as a function of (sentence, prefix after BOS): ``tables[s][prefix]`` (probabilities
    over the 6 tokens) where listed, else seeded random logits. The state is batch-first, so beam
    search reorders it by index like any model's."""

    def __init__(self, tables: list[dict[tuple[int, ...], list[float]]], seed: int = 0, scale: float = 2.0) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # the search reads the device from the parameters
        self.tables, self.seed, self.scale = tables, seed, scale

    def start(self) -> dict[str, Tensor]:
        n = len(self.tables)
        return {"sentence": torch.arange(n), "prefix": torch.empty(n, 0, dtype=torch.long)}

    def logprobs(self, sentence: int, prefix: tuple[int, ...]) -> Tensor:
        """Next-token log-probabilities (V,) in float64."""
        if prefix in self.tables[sentence]:
            return torch.tensor(self.tables[sentence][prefix], dtype=torch.float64).log().log_softmax(-1)
        g = torch.Generator().manual_seed(self.seed * 7919 + sentence * 131 + zlib.crc32(bytes(prefix)))
        return (self.scale * torch.randn(VOCAB, generator=g, dtype=torch.float64)).log_softmax(-1)

    def decode_step(self, tokens: Tensor, state: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        prefix = torch.cat([state["prefix"], tokens[:, None]], dim=1)  # (N, t+1), BOS first
        rows = zip(state["sentence"].tolist(), prefix[:, 1:].tolist())
        logits = torch.stack([self.logprobs(s, tuple(p)) for s, p in rows])  # (N, V)
        return logits, {"sentence": state["sentence"], "prefix": prefix}


def score(model: TableModel, sentence: int, tokens: list[int], alpha: float) -> float:
    """sum log p / |y|**α of one output row (up to and including EOS)."""
    tokens = tokens[: tokens.index(EOS) + 1] if EOS in tokens else tokens
    total = sum(float(model.logprobs(sentence, tuple(tokens[:i]))[t]) for i, t in enumerate(tokens))
    return total / len(tokens) ** alpha


def exhaustive(model: TableModel, sentence: int, max_len: int, alpha: float, min_len: int = 0
               ) -> list[tuple[float, list[int]]]:
    """Every allowed complete sequence with its normalized score, best first."""
    found = []

    def walk(prefix: tuple[int, ...], total: float) -> None:
        logp = model.logprobs(sentence, prefix)
        for token in range(VOCAB):
            if token in SPECIAL or (token == EOS and len(prefix) < min_len):
                continue
            y, s = prefix + (token,), total + float(logp[token])
            if token == EOS or len(y) == max_len:
                found.append((s / len(y) ** alpha, list(y)))
            else:
                walk(y, s)

    walk((), 0.0)
    return sorted(found, key=lambda c: -c[0])


def rows(out: Tensor) -> list[list[int]]:
    """Output rows without the PAD after EOS."""
    return [r[: r.index(EOS) + 1] if EOS in r else [t for t in r if t != PAD] for r in out.tolist()]


def random_tables(n: int) -> list[dict]:
    return [{} for _ in range(n)]


@pytest.mark.parametrize("min_len", [0, 2])
@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.0, 2.0, -0.5])
@pytest.mark.parametrize("seed", range(6))
def test_wide_beam_equals_exhaustive(seed, alpha, min_len):
    """K = 3**4 >= every candidate of every step (3 emittable tokens, 4 steps): nothing is pruned, so the
    beam's best finished hypothesis, with its score, is the exhaustive optimum (given exact stopping)."""
    model, max_len = TableModel(random_tables(3), seed=seed), 4
    out = beam_search(model, model.start(), 3, max_len=max_len, beam_size=81, length_penalty=alpha,
                      min_len=min_len, **KW)
    for s, got in enumerate(rows(out)):
        ranked = exhaustive(model, s, max_len, alpha, min_len)
        assert ranked[0][0] - ranked[1][0] > 1e-9  # a unique optimum
        assert got == ranked[0][1]
        assert score(model, s, got, alpha) == pytest.approx(ranked[0][0], abs=1e-12)


def finished_beam_toy() -> TableModel:
    """Root: eos 0.67, b 0.30, x 0.03; after b: eos 0.60, x 0.39; after bx: eos 0.95.
    α = 2: 'eos' scores log .67 / 1 = -0.40, 'b eos' -1.71 / 4 = -0.43, 'b x eos' -2.19 / 9 = -0.24 (best).
    A search that let finished beams compete for the K = 2 live slots would keep 'eos' and 'b eos' at
    step 2, drop 'b x' and return ['eos']. α = 0: 'eos' is best."""
    eps = 1e-3  # every special token keeps a little probability (masked by the search, not by the table)
    table = {(): [eps, eps, 0.67, eps, 0.30, 0.03], (B,): [eps, eps, 0.60, eps, 0.01, 0.39],
             (B, X): [eps, eps, 0.95, eps, 0.02, 0.03]}
    return TableModel([table])


@pytest.mark.parametrize("k", [2, 3])
def test_finished_beams_leave_the_slots_to_live_ones_and_alpha_decides(k):
    model = finished_beam_toy()
    for alpha, want in ((2.0, [B, X, EOS]), (0.0, [EOS])):
        assert exhaustive(model, 0, 3, alpha)[0][1] == want
        out = beam_search(model, model.start(), 1, max_len=3, beam_size=k, length_penalty=alpha, **KW)
        assert rows(out) == [want]
    assert rows(greedy_search(model, model.start(), 1, max_len=3, **KW)) == [[EOS]]


@pytest.mark.parametrize("alpha", [0.0, 2.0])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_small_beams_equal_exhaustive_where_greedy_is_optimal(k, alpha):
    """Every step has one token of probability 0.9 and the rest share 0.1, along 'b b eos': greedy, every
    beam and exhaustive search agree for both penalties (the long finalized 'b b b' loses: p(b|bb) is small)."""
    table = {(): [0.025, 0.025, 0.02, 0.025, 0.9, 0.005], (B,): [0.025, 0.025, 0.04, 0.025, 0.88, 0.005],
             (B, B): [0.025, 0.025, 0.9, 0.025, 0.04, 0.01]}
    model = TableModel([table, table])
    want = exhaustive(model, 0, 3, alpha)[0][1]
    assert want == [B, B, EOS]
    out = beam_search(model, model.start(), 2, max_len=3, beam_size=k, length_penalty=alpha, **KW)
    assert rows(out) == [want, want]


@pytest.mark.parametrize("seed", range(4))
def test_beam_core_with_one_beam_and_no_penalty_is_greedy(seed):
    """``beam_search(beam_size=1)`` calls greedy search; the beam loop itself with K = 1, α = 0 is greedy too."""
    model = TableModel(random_tables(4), seed=seed)
    greedy = greedy_search(model, model.start(), 4, max_len=5, min_len=1, **KW)
    core = _beam(model, model.start(), 4, max_len=5, min_len=1, beam_size=1, alpha=0.0, **KW)
    assert torch.equal(core, greedy)


class ConstantModel(TableModel):
    """The same next-token probabilities after every prefix; one row of ``probs`` per sentence."""

    def __init__(self, probs: list[list[float]]) -> None:
        super().__init__([{} for _ in probs])
        self.probs = probs

    def logprobs(self, sentence: int, prefix: tuple[int, ...]) -> Tensor:
        return torch.tensor(self.probs[sentence], dtype=torch.float64).log().log_softmax(-1)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_special_tokens_never_emitted_and_min_len_respected(k):
    """PAD, BOS and UNK hold most of the probability; EOS is the likeliest allowed token, so it comes
    as soon as allowed, and 'b' (0.03-0.05) beats 'x' (0.02)."""
    model = ConstantModel([[0.3, 0.3, 0.2, 0.15, 0.03 + 0.01 * s, 0.02] for s in range(3)])
    for min_len in (0, 3):
        out = beam_search(model, model.start(), 3, max_len=6, beam_size=k, length_penalty=1.0, min_len=min_len, **KW)
        for row in rows(out):
            assert not set(row) & set(SPECIAL)
            assert EOS in row and row.index(EOS) >= min_len  # EOS is the likeliest allowed token: as soon as allowed
            assert len(row) == min_len + 1


@pytest.mark.parametrize("seed", range(4))
def test_min_len_on_random_tables(seed):
    model = TableModel(random_tables(3), seed=seed, scale=3.0)
    for search in (greedy_search, lambda *a, **kw: beam_search(*a, beam_size=3, length_penalty=0.6, **kw)):
        out = search(model, model.start(), 3, max_len=6, min_len=4, **KW)
        for row in rows(out):
            assert EOS not in row[:4] and not set(row) & set(SPECIAL)


def test_max_len_finalizes_live_beams_with_the_penalty():
    """'b b b' reaches max_len = 3 without EOS: finalized as -0.96 / 3**2 = -0.11 it beats the finished
    'b eos' (-0.74 / 2**2 = -0.19) at α = 2; at α = 0, 'b eos' wins (-0.74 > -0.96)."""
    eps = 1e-3
    table = {(): [eps, eps, 0.02, eps, 0.95, 0.03], (B,): [eps, eps, 0.5, eps, 0.45, 0.05],
             (B, B): [eps, eps, 0.02, eps, 0.9, 0.08]}
    model = TableModel([table])
    for alpha, want in ((2.0, [B, B, B]), (0.0, [B, EOS])):
        assert exhaustive(model, 0, 3, alpha)[0][1] == want
        assert rows(beam_search(model, model.start(), 1, max_len=3, beam_size=2, length_penalty=alpha, **KW)) == [want]
    assert beam_search(model, model.start(), 1, max_len=0, beam_size=2, **KW).shape == (1, 0)


def test_bound_is_exact_not_the_current_length_heuristic():
    """With α > 0 a live hypothesis can still win after a finished one beats it at the current length:
    the bound divides by max_len**α. Root: eos 0.5 (finished, -0.69); b 0.45 then b→b→eos likely."""
    eps = 1e-3
    table = {(): [eps, eps, 0.5, eps, 0.45, 0.047], (B,): [eps, eps, 0.05, eps, 0.9, 0.047],
             (B, B): [eps, eps, 0.05, eps, 0.9, 0.047], (B, B, B): [eps, eps, 0.95, eps, 0.02, 0.027]}
    model = TableModel([table])
    # at step 1 the live 'b' (-0.80 / 1**2) cannot beat 'eos' (-0.69) at length 1, but 'b b b eos' wins
    want = exhaustive(model, 0, 4, 2.0)[0][1]
    assert want == [B, B, B, EOS]
    assert rows(beam_search(model, model.start(), 1, max_len=4, beam_size=2, length_penalty=2.0, **KW)) == [want]


class Counting(TableModel):
    """A TableModel that counts its decoding steps."""

    steps = 0

    def decode_step(self, tokens: Tensor, state: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        self.steps += 1
        return super().decode_step(tokens, state)


def test_stops_when_no_live_hypothesis_can_win():
    """finished_beam_toy, α = 0: after step 1 'eos' (-0.40) beats the best live sum ('b', -1.20), which can only
    fall: one step, not max_len. α = 2: the live 'b' could still reach -1.20 / 3**2: all 3 steps run."""
    for alpha, steps in ((0.0, 1), (2.0, 3)):
        model = Counting(finished_beam_toy().tables)
        beam_search(model, model.start(), 1, max_len=3, beam_size=2, length_penalty=alpha, **KW)
        assert model.steps == steps
