"""Hybrids: one attention per layer (Based mixes sliding-window and Taylor linear attention layers).

The library takes one spec or exactly one per layer; the configs take ``model.layer_attentions``
(one per layer) or an attention config with ``layers`` (``attention=based``: a pattern tiled over
the stack). Shared weights do not depend on the mix; decoding steps every layer with its own state.
"""


import pytest
import pytorch_lightning as pl
import torch

from efficient_attn.attention.sliding_window import SlidingWindowAttention
from efficient_attn.attention.softmax import SoftmaxAttention
from efficient_attn.attention.taylor import TaylorAttention
from efficient_attn.transformer import (
    AttentionSpec,
    Seq2SeqTransformer,
    TransformerClassifier,
    TransformerConfig,
    TransformerLM,
    decode_state_size,
)
from efficient_attn_tasks.config.checks import ConfigError, check_config
from efficient_attn_tasks.config.labels import attention_label
from efficient_attn_tasks.config.schema import attention_spec
from efficient_attn_tasks.run.fit import run
from efficient_attn_tasks.run.record import RunRecord
from tests.helpers import config, tiny_cfg

pytestmark = pytest.mark.usefixtures("one_thread")

SW = AttentionSpec("sliding_window", {"window": 4})
TAYLOR = AttentionSpec("taylor", {"feature_dim": 4})
CFG = TransformerConfig(d_model=16, num_heads=2, d_ff=32, encoder_layers=2, decoder_layers=2, max_len=64, dropout=0.0,
                        positional="learned", tie_embeddings=False)


def lm(attention, cfg=CFG, seed=3) -> TransformerLM:
    torch.manual_seed(seed)
    return TransformerLM(cfg, 20, attention=attention).double().eval()


def shared(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every state entry outside the core attentions (embeddings, Q/K/V/O, feed-forward, norms, output)."""
    return {n: t for n, t in model.state_dict().items() if ".attention." not in n}


def cores(model) -> list[torch.nn.Module]:
    return [layer.self_attn.attention for layer in model.decoder.layers]


# ----------------------------------------------------------------------------- library
def test_each_layer_gets_its_attention_and_the_model_is_the_hand_built_composition():
    hybrid = lm([SW, TAYLOR])
    assert [type(a) for a in cores(hybrid)] == [SlidingWindowAttention, TaylorAttention]
    assert cores(hybrid)[0].window == 4 and cores(hybrid)[1].feature_dim == 4
    # hand-built: the all-sliding-window model with its layer 1 taken from the all-Taylor model (same seed)
    composed, taylor = lm(SW), lm(TAYLOR)
    composed.decoder.layers[1] = taylor.decoder.layers[1]
    assert hybrid.state_dict().keys() == composed.state_dict().keys()
    assert all(torch.equal(t, composed.state_dict()[n]) for n, t in hybrid.state_dict().items())
    tokens = torch.randint(0, 20, (2, 11))
    want = composed(tokens)
    assert torch.equal(hybrid(tokens), want)
    assert not torch.allclose(lm(SW)(tokens), want) and not torch.allclose(taylor(tokens), want)


def test_decoding_a_mixed_stack_equals_the_causal_forward():
    cfg = TransformerConfig(**{**CFG.__dict__, "decoder_layers": 3})
    model = lm([AttentionSpec("sliding_window", {"window": 3}), TAYLOR, AttentionSpec("softmax")], cfg)
    tokens = torch.randint(0, 20, (2, 10))
    state, rows = model.start(), []
    for t in range(tokens.shape[1]):
        logits, state = model.decode_step(tokens[:, t], state)
        rows.append(logits)
    torch.testing.assert_close(torch.stack(rows, 1), model(tokens), rtol=1e-10, atol=1e-10)
    assert state["layers"][0]["self"]["k"].shape[2] == 3  # the sliding window keeps only its last w keys
    sizes = [decode_state_size(model, n, layer=i) for n in (6, 10) for i in range(3)]
    assert sizes[0] == sizes[3] == 2 * 3 * 16  # window-bounded cache: 2·w·d_model
    assert sizes[1] == sizes[4]  # Taylor running sum: independent of the length
    assert sizes[5] == 2 * 10 * 16 and sizes[2] == 2 * 6 * 16  # softmax KV cache grows
    assert decode_state_size(model, 10) == pytest.approx(sum(sizes[3:]) / 3)


@pytest.mark.parametrize("kind", ["lm", "classifier", "seq2seq"])
def test_same_seed_same_shared_weights_whatever_the_layer_mix(kind):
    def build(self_attention, seed=3):
        torch.manual_seed(seed)
        if kind == "lm":
            model = TransformerLM(CFG, 20, attention=self_attention)
        elif kind == "classifier":
            model = TransformerClassifier(CFG, 20, 5, attention=self_attention)
        else:
            model = Seq2SeqTransformer(CFG, 20, encoder_attention=self_attention, decoder_attention=self_attention,
                                       cross_attention=AttentionSpec("softmax"))
        return model, torch.get_rng_state()

    reference, rng_reference = build(AttentionSpec("softmax"))
    hybrid, rng_hybrid = build([TAYLOR, SW])  # what attention=based builds on two layers
    assert torch.equal(rng_hybrid, rng_reference)
    want, got = shared(reference), shared(hybrid)
    assert want.keys() == got.keys() and len(want) > 10
    assert [n for n in want if not torch.equal(want[n], got[n])] == []
    assert any(".attention." in n for n in hybrid.state_dict())  # Taylor's own projection: excluded above


def test_a_list_needs_one_attention_per_layer():
    with pytest.raises(ValueError, match=r"decoder attention: 3 per-layer attention\(s\) for 2 layer\(s\)"):
        TransformerLM(CFG, 20, attention=[SW, TAYLOR, SW])
    with pytest.raises(ValueError, match=r"encoder attention: 1 per-layer attention\(s\) for 2 layer\(s\)"):
        TransformerClassifier(CFG, 20, 5, attention=[TAYLOR])


def test_each_layer_is_checked_for_its_site():
    with pytest.raises(ValueError, match=r"encoder attention, layer 1: attention 'retention' cannot serve as encoder"):
        TransformerClassifier(CFG, 20, 5, attention=[AttentionSpec("softmax"), AttentionSpec("retention")])
    with pytest.raises(ValueError, match=r"decoder attention, layer 0: .*'nope'"):
        TransformerLM(CFG, 20, attention=[AttentionSpec("nope"), TAYLOR])
    TransformerLM(CFG, 20, attention=[AttentionSpec("retention"), TAYLOR])  # causal-only serves a decoder


# ----------------------------------------------------------------------------- configs
def test_based_config_tiles_its_pattern_and_layer_attentions_override_it():
    cfg = config("task=lm", "attention=based")  # model=small: 3 decoder layers
    specs = attention_spec(cfg, "decoder")
    assert [(s.name, s.kwargs) for s in specs] == [("taylor", {"feature_dim": 16}), ("sliding_window", {"window": 64}),
                                                   ("taylor", {"feature_dim": 16})]
    assert cfg.attention.name == attention_label(cfg) == "based"
    cfg = config("task=lm", "attention=based", "model.layer_attentions=[sliding_window_w16,softmax,"
                 "{name: taylor, kwargs: {feature_dim: 8}}]")  # config names: their yaml's kwargs apply
    assert attention_spec(cfg, "decoder") == [AttentionSpec("sliding_window", {"window": 16}), AttentionSpec("softmax"),
                                              AttentionSpec("taylor", {"feature_dim": 8})]
    assert attention_label(cfg) == "sliding_window_w16+softmax+taylor"
    cfg = config("task=lm", "attention=based", "++model.decoder_attention={name: softmax, kwargs: {}}")
    assert attention_spec(cfg, "decoder") == AttentionSpec("softmax")  # a per-site override wins


def test_a_site_attention_may_be_a_config_name():
    cfg = config("task=translation", "model.decoder_attention=sliding_window_w16")
    check_config(cfg)
    assert attention_spec(cfg, "decoder") == AttentionSpec("sliding_window", {"window": 16})  # its yaml's kwargs
    assert attention_spec(cfg, "encoder") == AttentionSpec("softmax")
    check_config(config("task=lm", "model.encoder_attention=favor_plus"))  # a site the task lacks: checked alone
    with pytest.raises(ConfigError, match=r"model.decoder_attention: unknown attention config 'nosuch'; choose"):
        check_config(config("task=translation", "model.decoder_attention=nosuch"))
    with pytest.raises(ConfigError, match=r"cannot serve as encoder attention"):
        check_config(config("task=translation", "model.encoder_attention=gla"))


def test_translation_uses_the_hybrid_for_both_self_attention_stacks_and_needs_a_cross_attention():
    with pytest.raises(ConfigError, match=r"'based' is a per-layer hybrid .* set model.cross_attention"):
        check_config(config("task=translation", "attention=based"))
    cfg = config("task=translation", "attention=based", "model.encoder_layers=2", "model.decoder_layers=4",
                 "++model.cross_attention={name: softmax, kwargs: {}}")
    check_config(cfg)
    assert [s.name for s in attention_spec(cfg, "encoder")] == ["taylor", "sliding_window"]
    assert [s.name for s in attention_spec(cfg, "decoder")] == ["taylor", "sliding_window"] * 2
    assert attention_spec(cfg, "cross") == AttentionSpec("softmax")


def test_config_errors_name_the_layer_and_the_choices():
    with pytest.raises(ConfigError, match=r"model.layer_attentions has 2 entries but the decoder has 3 layers"):
        check_config(config("task=lm", "model.layer_attentions=[sliding_window,taylor]"))
    with pytest.raises(ConfigError, match=r"encoder attention, layer 1: attention 'retention' cannot serve as encoder"):
        check_config(config("task=listops", "model.layer_attentions=[taylor,retention,softmax]"))
    with pytest.raises(ConfigError, match=r"\[1\]: unknown attention config 'taylr'; choose one of \[.*'taylor'"):
        check_config(config("task=lm", "model.layer_attentions=[softmax,taylr,softmax]"))
    with pytest.raises(ConfigError, match=r"layer 0: attention 'sliding_window' has no option\(s\) \['windw'\]"):
        check_config(config("task=lm", "model.layer_attentions=[{name: sliding_window, kwargs: {windw: 4}},taylor,"
                            "taylor]"))
    with pytest.raises(ConfigError, match=r"\[2\]: 'based' is itself a per-layer hybrid"):
        check_config(config("task=lm", "model.layer_attentions=[softmax,taylor,based]"))
    check_config(config("task=listops", "attention=based"))  # both its layers serve an encoder


# ----------------------------------------------------------------------------- the CLI path
class Layers(pl.Callback):
    """The self-attention cores the trained model was built with."""

    def on_fit_start(self, trainer, module) -> None:
        self.cores = [type(layer.self_attn.attention) for layer in module.model.decoder.layers]


@pytest.mark.parametrize("attention, overrides, label, cores", [
    ("based", [], "based", [TaylorAttention, SlidingWindowAttention]),
    ("softmax", ["model.layer_attentions=[sliding_window,taylor]"], "sliding_window+taylor",
     [SlidingWindowAttention, TaylorAttention]),
], ids=["based", "layer_attentions"])
def test_tiny_mqar_run_with_a_hybrid_writes_results(tmp_path, attention, overrides, label, cores):
    layers = Layers()
    cfg = tiny_cfg("mqar", attention, *overrides, "++trainer.fast_dev_run=true")
    record = run(cfg, tmp_path, callbacks=[layers])
    assert layers.cores == cores
    saved = RunRecord.read(tmp_path / "results.json")
    assert saved.attention == record.attention == label and saved.metrics.test["test/acc"] >= 0
    assert saved.config["attention"]["name"] == cfg.attention.name


def test_softmax_is_untouched_by_the_hybrid_machinery():
    assert [type(a) for a in cores(lm(AttentionSpec("softmax")))] == [SoftmaxAttention] * 2
    assert attention_spec(config("task=lm"), "decoder") == AttentionSpec("softmax")
