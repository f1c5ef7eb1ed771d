"""The plain-PyTorch Transformer: step-by-step decoding equals the full causal forward (float64) for
every attention, beam search, and clear errors for bad dimensions."""

import pytest
import torch

import efficient_attn as ea
from efficient_attn.generate import beam_search, greedy_search
from efficient_attn.transformer import (
    AttentionSpec,
    Seq2SeqTransformer,
    TransformerClassifier,
    TransformerConfig,
    TransformerLM,
    count_parameters,
    sinusoid_table,
)

from .helpers import site_specs

VOCAB, BOS, EOS, PAD = 40, 2, 3, 0


def spec(name: str) -> AttentionSpec:
    """cosFormer decodes with a fixed M (max_len 16 covers every position here)."""
    return AttentionSpec(name, {"favor": {"num_features": 32}, "cosformer": {"max_len": 16}}.get(name, {}))


def config(**kw) -> TransformerConfig:
    base = dict(d_model=32, num_heads=4, d_ff=64, encoder_layers=2, decoder_layers=2, dropout=0.1, max_len=64)
    return TransformerConfig(**{**base, **kw})


def seq2seq(name: str, **kw) -> Seq2SeqTransformer:
    """``name`` at every site it can serve, softmax at the others (``site_specs``)."""
    s = site_specs(spec(name))
    model = Seq2SeqTransformer(config(**kw), VOCAB, encoder_attention=s["encoder"], decoder_attention=s["decoder"],
                               cross_attention=s["cross"])
    return model.double().eval()


def batch():
    src = torch.randint(4, VOCAB, (3, 9))
    src_mask = torch.zeros(3, 9, dtype=torch.bool)
    src_mask[1, 6:] = True
    src_mask[2, 3:] = True
    return src, src_mask, torch.randint(4, VOCAB, (3, 7))


def step_through(model, state, tokens):
    logits = []
    for t in range(tokens.shape[1]):
        out, state = model.decode_step(tokens[:, t], state)  # (B, V)
        logits.append(out)
    return torch.stack(logits, dim=1)  # (B, T, V)


@pytest.mark.parametrize("name", ea.list_attentions())
@pytest.mark.parametrize("norm_first, positional", [(True, "sinusoidal"), (False, "learned")])
def test_seq2seq_incremental_decoding_matches_full_forward(name, norm_first, positional):
    model = seq2seq(name, norm_first=norm_first, positional=positional)
    src, src_mask, tgt = batch()
    full = model(src, tgt, src_mask)  # (B, T, V)
    stepped = step_through(model, model.start(src, src_mask), tgt)
    torch.testing.assert_close(stepped, full, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", ea.list_attentions())
def test_lm_incremental_decoding_matches_full_forward(name):
    model = TransformerLM(config(), VOCAB, attention=spec(name)).double().eval()
    tokens = torch.randint(0, VOCAB, (2, 11))
    torch.testing.assert_close(step_through(model, model.start(), tokens), model(tokens), rtol=0, atol=1e-10)


@pytest.mark.parametrize("prefix", [1, 5, 10])
@pytest.mark.parametrize("name", ea.list_attentions())
def test_lm_prefill_gives_the_stepped_state_and_decoding_continues_the_forward(name, prefix):
    """``prefill`` of a t-token prompt: the logits after it and the state (every layer's) that t steps
    give, pre-LN and post-LN; decoding from that state continues the full causal forward."""
    for norm_first, positional in ((True, "sinusoidal"), (False, "learned")):
        model = TransformerLM(config(norm_first=norm_first, positional=positional), VOCAB,
                              attention=spec(name)).double().eval()
        tokens = torch.randint(0, VOCAB, (2, 11))
        full = model(tokens)  # (B, T, V)
        logits, state = model.prefill(tokens[:, :prefix])
        stepped = model.start()
        for t in range(prefix):
            _, stepped = model.decode_step(tokens[:, t], stepped)
        torch.testing.assert_close(state, stepped, rtol=0, atol=1e-10)
        torch.testing.assert_close(logits, full[:, prefix - 1], rtol=0, atol=1e-10)
        rest = step_through(model, state, tokens[:, prefix:])
        torch.testing.assert_close(rest, full[:, prefix:], rtol=0, atol=1e-10)


def test_prefill_needs_a_prompt_and_a_decoder_only_stack():
    model = TransformerLM(config(), VOCAB, attention=spec("softmax"))
    with pytest.raises(ValueError, match="T >= 1"):
        model.prefill(torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="causal self-attention"):
        seq2seq("softmax").decoder.prefill(torch.zeros(1, 3, 32, dtype=torch.float64))


@pytest.mark.parametrize("name", ["softmax", "favor"])
def test_decoder_is_causal(name):
    model = seq2seq(name)
    src, src_mask, tgt = batch()
    changed = tgt.clone()
    changed[:, 4:] = (changed[:, 4:] + 1) % VOCAB
    torch.testing.assert_close(model(src, changed, src_mask)[:, :4], model(src, tgt, src_mask)[:, :4], rtol=0,
                               atol=1e-12)


@pytest.mark.parametrize("name", ["softmax", "favor", "additive"])
def test_encoder_ignores_padding(name):
    model = seq2seq(name)
    src, src_mask, tgt = batch()
    noisy = src.masked_fill(src_mask, 7)  # different tokens in padded slots
    torch.testing.assert_close(model(noisy, tgt, src_mask), model(src, tgt, src_mask), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["softmax", "favor"])
def test_beam_one_is_greedy_and_beams_score_at_least_greedy(name):
    torch.manual_seed(1)
    model = seq2seq(name)
    src, src_mask, _ = batch()
    kw = dict(bos=BOS, eos=EOS, pad=PAD, max_len=12)
    greedy = greedy_search(model, model.start(src, src_mask), 3, **kw)
    assert torch.equal(beam_search(model, model.start(src, src_mask), 3, beam_size=1, **kw), greedy)
    beam = beam_search(model, model.start(src, src_mask), 3, beam_size=5, length_penalty=0.0, **kw)

    def logprob(out):  # sum of log-probabilities up to and including EOS
        tgt_in = torch.cat([torch.full((3, 1), BOS), out[:, :-1]], dim=1)
        logp = model(src, tgt_in, src_mask).log_softmax(-1).gather(-1, out[..., None])[..., 0]
        alive = torch.cumsum((out == EOS).long(), 1) - (out == EOS).long() == 0
        return (logp * alive).sum(1)

    assert (logprob(beam) >= logprob(greedy) - 1e-9).all()


def test_outputs_end_at_eos_and_are_padded_after():
    model = seq2seq("softmax")
    src, src_mask, _ = batch()
    out = beam_search(model, model.start(src, src_mask), 3, bos=BOS, eos=EOS, pad=PAD, max_len=30, beam_size=3)
    for row in out.tolist():
        if EOS in row:
            assert all(t == PAD for t in row[row.index(EOS) + 1 :])


def test_tied_embeddings_share_one_matrix():
    tied, untied = seq2seq("softmax"), seq2seq("softmax", tie_embeddings=False)
    assert tied.output.weight is tied.embed_src.tokens.weight is tied.embed_tgt.tokens.weight
    assert count_parameters(untied) - count_parameters(tied) == 2 * VOCAB * 32


def test_classifier_and_head_dim_override():
    model = TransformerClassifier(config(head_dim=16), VOCAB, 10, attention=spec("softmax"))
    assert model.encoder.layers[0].self_attn.head_dim == 16
    tokens = torch.randint(1, VOCAB, (2, 5))
    assert model(tokens, tokens == 0).shape == (2, 10)


def test_sinusoid_table_matches_the_paper():
    table = sinusoid_table(50, 8).double()
    pos, i = 17, 2
    assert table[pos, 2 * i].item() == pytest.approx(torch.sin(torch.tensor(pos / 10000 ** (2 * i / 8))).item(),
                                                     abs=1e-6)
    assert table[pos, 2 * i + 1].item() == pytest.approx(torch.cos(torch.tensor(pos / 10000 ** (2 * i / 8))).item(),
                                                         abs=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(d_model=30, num_heads=4), "not divisible by model.num_heads"),
        (dict(positional="rotary"), "positional"),
        (dict(activation="swish"), "activation"),
        (dict(dropout=1.0), "dropout"),
        (dict(encoder_layers=-1), "encoder_layers"),
    ],
)
def test_bad_dimensions_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        config(**kwargs)


def test_too_long_input_and_bad_attention_raise():
    model = seq2seq("softmax")
    with pytest.raises(ValueError, match="max_len"):
        model(torch.randint(4, VOCAB, (1, 65)), torch.randint(4, VOCAB, (1, 3)))
    with pytest.raises(ValueError, match="unknown attention .sofmax.. Did you mean .softmax."):
        TransformerLM(config(), VOCAB, attention=AttentionSpec("sofmax"))
    with pytest.raises(TypeError, match="num_feature"):
        TransformerLM(config(), VOCAB, attention=AttentionSpec("favor", {"num_feature": 8}))


@pytest.mark.parametrize("name, constant", [("favor", True), ("linear", True), ("softmax", False), ("additive", False),
                                            ("retention", True)])
def test_decoding_state_is_constant_size_for_kernelized_attention(name, constant):
    model = TransformerLM(config(), VOCAB, attention=spec(name)).eval()
    state, sizes = model.start(), []
    for t in range(6):
        _, state = model.decode_step(torch.tensor([t + 4]), state)
        sizes.append(sum(x.numel() for layer in state["layers"] for x in layer["self"].values()))
    assert (len(set(sizes)) == 1) == constant, sizes
