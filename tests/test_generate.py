"""Greedy and beam search against plain per-sentence Python references on a toy recurrent model.

The toy model's next-token logits depend on its hidden state (so beams must carry the right
state when reordered), on the last token, and on a per-sentence ``memory`` shared by the beams.
Beam search against exhaustive search on tiny vocabularies: tests/test_beam.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from efficient_attn.generate import beam_search, greedy_search, sample
from efficient_attn.transformer import AttentionSpec, TransformerConfig, TransformerLM

BOS, EOS, PAD = 0, 1, 2
NEVER = [BOS, PAD]  # special tokens the searches mask (no UNK in this vocabulary)


class ToyModel(nn.Module):
    """h_{t+1} = tanh(h_t W + E[token]);  logits = h_{t+1} C + memory (float64, batch-first state)."""

    def __init__(self, vocab: int = 6, dim: int = 4, eos_bias: float = 0.0, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(dim, dim, generator=g, dtype=torch.float64))
        self.embed = nn.Parameter(torch.randn(vocab, dim, generator=g, dtype=torch.float64))
        self.out = nn.Parameter(2 * torch.randn(dim, vocab, generator=g, dtype=torch.float64))
        self.eos_bias = eos_bias

    def start(self, memory: Tensor) -> dict[str, Tensor]:
        return {"h": torch.zeros(memory.shape[0], self.w.shape[0], dtype=torch.float64), "memory": memory}

    def decode_step(self, tokens: Tensor, state: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        h = torch.tanh(state["h"] @ self.w + self.embed[tokens])  # (B, dim)
        logits = h @ self.out + state["memory"]  # (B, V)
        logits[:, EOS] += self.eos_bias
        return logits, {"h": h, "memory": state["memory"]}


@torch.no_grad()
def one_step(model: ToyModel, h: Tensor, token: int, memory: Tensor) -> tuple[Tensor, Tensor]:
    """(log-probabilities (V,), BOS and PAD at -inf, new h) for one sentence."""
    logits, state = model.decode_step(torch.tensor([token]), {"h": h[None], "memory": memory[None]})
    logp = torch.log_softmax(logits[0].double(), -1)
    logp[NEVER] = float("-inf")
    return logp, state["h"][0]


def greedy_reference(model: ToyModel, memory: Tensor, max_len: int) -> list[list[int]]:
    rows = []
    for b in range(memory.shape[0]):
        h, token, row = torch.zeros(model.w.shape[0], dtype=torch.float64), BOS, []
        for _ in range(max_len):
            logp, h = one_step(model, h, token, memory[b])
            token = int(logp.argmax())
            row.append(token)
            if token == EOS:
                break
        rows.append(row)
    width = max(len(r) for r in rows)
    return [r + [PAD] * (width - len(r)) for r in rows]


def beam_reference(model: ToyModel, memory: Tensor, k: int, max_len: int, alpha: float) -> list[list[int]]:
    """Standard beam search, per sentence, in plain Python: K live (sum, tokens, h); each step the best
    2K one-token extensions; those ending in EOS among the best K are finished, scored sum / len**α;
    the best K others live on; stop when no live sum s can beat the best finished (s / L**α, L the
    largest reachable length for α > 0, the shortest for α <= 0); at max_len the live ones are scored too."""
    picks = []
    for b in range(memory.shape[0]):
        live, best = [(0.0, [], torch.zeros(model.w.shape[0], dtype=torch.float64))], (float("-inf"), [])
        for step in range(max_len):
            cands = []
            for total, toks, h in live:
                logp, h2 = one_step(model, h, toks[-1] if toks else BOS, memory[b])
                cands += [(total + float(logp[t]), toks + [t], h2) for t in range(len(logp))]
            cands = sorted(cands, key=lambda c: -c[0])[: 2 * k]
            for total, toks, _ in cands[:k]:
                if toks[-1] == EOS and total / len(toks) ** alpha > best[0]:
                    best = (total / len(toks) ** alpha, toks)
            live = [c for c in cands if c[1][-1] != EOS][:k]
            reach = max_len if alpha > 0 else min(step + 2, max_len)
            if best[0] >= max(c[0] for c in live) / reach**alpha:
                break
        else:
            for total, toks, _ in live:
                if total / max_len**alpha > best[0]:
                    best = (total / max_len**alpha, toks)
        picks.append(best[1])
    return picks


def memories(batch: int, vocab: int, seed: int) -> Tensor:
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("eos_bias", [-1.0, 1.5])
@pytest.mark.parametrize("seed", range(4))
def test_greedy_equals_reference(seed, eos_bias):
    model = ToyModel(eos_bias=eos_bias, seed=seed)
    memory = memories(3, 6, seed)
    got = greedy_search(model, model.start(memory), 3, bos=BOS, eos=EOS, pad=PAD, max_len=7)
    assert got.tolist() == greedy_reference(model, memory, 7)


@pytest.mark.parametrize("alpha", [0.0, 0.6, 2.0])
@pytest.mark.parametrize("k", [2, 3, 5])
@pytest.mark.parametrize("eos_bias", [-1.0, 1.0])
@pytest.mark.parametrize("seed", range(4))
def test_beam_equals_reference(seed, eos_bias, k, alpha):
    model = ToyModel(eos_bias=eos_bias, seed=seed)
    memory = memories(3, 6, 10 + seed)
    got = beam_search(model, model.start(memory), 3, bos=BOS, eos=EOS, pad=PAD, max_len=6,
                      beam_size=k, length_penalty=alpha)
    want = beam_reference(model, memory, k, 6, alpha)
    width = max(len(row) for row in want)  # as wide as the longest pick
    assert got.tolist() == [row + [PAD] * (width - len(row)) for row in want]


def test_beam_one_equals_greedy():
    for seed in range(3):
        model = ToyModel(eos_bias=0.5, seed=seed)
        memory = memories(4, 6, seed)
        kw = dict(bos=BOS, eos=EOS, pad=PAD, max_len=8)
        greedy = greedy_search(model, model.start(memory), 4, **kw)
        beam = beam_search(model, model.start(memory), 4, beam_size=1, **kw)
        assert torch.equal(beam, greedy)


def test_zero_steps_and_bad_beam_size():
    model = ToyModel()
    memory = memories(2, 6, 0)
    assert greedy_search(model, model.start(memory), 2, bos=BOS, eos=EOS, pad=PAD, max_len=0).shape == (2, 0)
    assert beam_search(model, model.start(memory), 2, bos=BOS, eos=EOS, pad=PAD, max_len=0).shape == (2, 0)
    with pytest.raises(ValueError, match="beam_size"):
        beam_search(model, model.start(memory), 2, bos=BOS, eos=EOS, pad=PAD, max_len=3, beam_size=0)


def test_reorder_beams_reaches_every_tensor_in_nested_states_but_shared_memory():
    """Beam states nest dicts, lists and tuples (the Transformer's layers); every tensor is reordered
    by batch row, keeping its container type, except the cross-attention ``memory`` shared by beams."""
    from efficient_attn.generate import _reorder_beams

    rows = torch.arange(4.0)[:, None]  # (4, 1): row i holds i
    state = {"layers": [{"self": (rows, rows * 10)}, {"self": [rows]}], "memory": rows, "pos": 3}
    index = torch.tensor([2, 2, 0, 1])
    out = _reorder_beams(state, index)
    assert isinstance(out["layers"], list) and isinstance(out["layers"][0]["self"], tuple)
    assert isinstance(out["layers"][1]["self"], list)
    assert out["layers"][0]["self"][0].flatten().tolist() == [2, 2, 0, 1]
    assert out["layers"][0]["self"][1].flatten().tolist() == [20, 20, 0, 10]
    assert out["layers"][1]["self"][0].flatten().tolist() == [2, 2, 0, 1]
    assert out["memory"] is rows and out["pos"] == 3


# ----------------------------------------------------------------------------- sampled continuation
def tiny_lm(name: str = "softmax") -> TransformerLM:
    torch.manual_seed(3)
    cfg = TransformerConfig(d_model=16, num_heads=2, d_ff=32, decoder_layers=2, dropout=0.0, max_len=32)
    return TransformerLM(cfg, 11, attention=AttentionSpec(name)).double().eval()


def forward_logits(model: TransformerLM, tokens: Tensor) -> Tensor:
    """Next-token logits (B, V) after ``tokens`` by the full forward: the reference, no decoding state."""
    with torch.no_grad():
        return model(tokens)[:, -1]


@pytest.mark.parametrize("name", ["softmax", "favor", "linear"])
def test_greedy_sample_equals_argmax_of_the_full_forward(name):
    model = tiny_lm(name)
    prompt = torch.tensor([[1, 4, 7], [2, 2, 9]])
    got = sample(model, prompt, 6, temperature=0.0)
    tokens = prompt
    for _ in range(6):
        tokens = torch.cat([tokens, forward_logits(model, tokens).argmax(-1, keepdim=True)], dim=1)
    assert got.tolist() == tokens[:, 3:].tolist()


def test_top_k_draws_only_among_the_k_most_likely_and_the_seed_fixes_the_draws():
    model = tiny_lm()
    prompt = torch.tensor([[1, 4, 7]] * 8)
    draw = lambda seed, k, t=1.0: sample(model, prompt, 5, temperature=t, top_k=k,
                                         generator=torch.Generator().manual_seed(seed))
    got = draw(0, 3)
    for step in range(5):
        context = torch.cat([prompt, got[:, :step]], dim=1)
        allowed = forward_logits(model, context).topk(3, dim=-1).indices  # (B, 3)
        assert (allowed == got[:, step : step + 1]).any(-1).all(), step
    assert torch.equal(draw(0, 3), got) and not torch.equal(draw(1, 3), got)
    assert torch.equal(draw(5, 1, t=2.0), sample(model, prompt, 5, temperature=0.0))  # top-1 is greedy


def test_sample_edge_cases():
    model = tiny_lm()
    prompt = torch.tensor([[1, 2]])
    assert sample(model, prompt, 0).shape == (1, 0)
    with pytest.raises(ValueError, match=">= 0"):
        sample(model, prompt, 3, temperature=-1.0)
