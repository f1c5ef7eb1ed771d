"""MultiHeadAttention's layer options (short convolution, output norm, output gate), RetNet's rotary
retention, and their config plumbing (``attention.layer``, labels)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from efficient_attn.attention.retention import rotate
from efficient_attn.multihead import MultiHeadAttention
from efficient_attn.transformer import AttentionSpec, TransformerConfig, TransformerLM, reorder_state

CAUSAL = ["softmax", "linear", "gla", "retention", "deltanet"]
ON = {"short_conv": 4, "output_norm": "rmsnorm", "output_gate": True}
OPTIONS = [{"short_conv": 4}, {"short_conv": 2, "output_norm": "groupnorm"}, ON]


def mha(name: str, seed: int = 0, kwargs: dict | None = None, **layer) -> MultiHeadAttention:
    torch.manual_seed(seed)
    return MultiHeadAttention(16, 2, name, kwargs, **layer).double()


def tokens(b: int = 2, length: int = 9, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, length, 16, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ----------------------------------------------------------------------------- defaults: the plain layer

@pytest.mark.parametrize("name", ["softmax", "gla", "retention"])
def test_defaults_are_the_plain_layer(name):
    """Explicit defaults add no parameter and give the projections → core → out_proj composition exactly."""
    plain, explicit = mha(name), mha(name, short_conv=0, output_norm=None, output_gate=False)
    names = [n for n, _ in plain.named_parameters()]
    assert names == [n for n, _ in explicit.named_parameters()]
    assert [n for n in names if not n.startswith("attention.")] == [
        f"{p}.{w}" for p in ("q_proj", "k_proj", "v_proj", "out_proj") for w in ("weight", "bias")]
    for a, b in zip(plain.parameters(), explicit.parameters()):
        assert torch.equal(a, b)
    x = tokens()
    split = [p(x).unflatten(-1, (2, 8)).transpose(1, 2) for p in (plain.q_proj, plain.k_proj, plain.v_proj)]
    token = {"x": x} if plain.attention.token_input else {}
    core = plain.attention(*split, causal=True, **token).transpose(1, 2).flatten(2)  # (B, L, H·D)
    assert torch.equal(plain(x, causal=True), plain.out_proj(core))
    assert torch.equal(plain(x, causal=True), explicit(x, causal=True))
    _, state = plain.decode_step(x[:, :1])
    assert "core" not in state and "conv" not in state  # the core's own state, as without layer options


def test_spec_without_layer_builds_the_same_model():
    torch.manual_seed(0)
    a = TransformerLM(TransformerConfig(32, 2, d_ff=32, decoder_layers=2), 11, attention=AttentionSpec("gla"))
    torch.manual_seed(0)
    b = TransformerLM(TransformerConfig(32, 2, d_ff=32, decoder_layers=2), 11, attention=AttentionSpec("gla", {}, {}))
    assert list(a.state_dict()) == list(b.state_dict())
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    t = torch.randint(0, 11, (2, 7))
    assert torch.equal(a.eval()(t), b.eval()(t))


def test_options_leave_the_projections_alone():
    plain, on = mha("gla"), mha("gla", **ON)
    for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
        assert torch.equal(getattr(plain, n).weight, getattr(on, n).weight)


# ----------------------------------------------------------------------------- short convolution

@pytest.mark.parametrize("name", CAUSAL)
def test_short_conv_is_causal(name):
    m, x = mha(name, short_conv=4), tokens(length=10)
    y = m(x, causal=True)
    x2 = x.clone()
    x2[:, 6:] = torch.randn_like(x2[:, 6:])
    y2 = m(x2, causal=True)
    assert torch.equal(y[:, :6], y2[:, :6]) and not torch.allclose(y[:, 6:], y2[:, 6:])


def test_short_conv_kernel_window():
    """Without the core mixing positions (a one-key window), position t's q sees exactly t−K+1..t."""
    m, x = mha("softmax", short_conv=3), tokens(length=8)
    q, _, _, _ = m._conv_qkv(x)
    for t in range(8):
        x2 = x.clone()
        x2[:, : max(t - 2, 0)] = 7.0  # before the window
        x2[:, t + 1 :] = -3.0  # after t
        q2, _, _, _ = m._conv_qkv(x2)
        assert torch.equal(q[:, :, t], q2[:, :, t])
    x3 = x.clone()
    x3[:, 2] += 1.0  # position 2 reaches 2, 3, 4 only
    q3, _, _, _ = m._conv_qkv(x3)
    changed = (q3 - q).abs().amax(dim=(0, 1, 3)) > 0  # (L,)
    assert changed.tolist() == [False, False, True, True, True, False, False, False]


@pytest.mark.parametrize("name", CAUSAL + ["retnet"])
@pytest.mark.parametrize("layer", OPTIONS)
def test_left_padding_gives_the_unpadded_outputs(name, layer):
    """Padded projections are zeroed before the conv: NaN or bias at padded positions cannot leak, and the
    real positions see what the unpadded sequence sees; padded rows output zeros."""
    kwargs = {"rotary": True} if name == "retnet" else None
    m = mha("retention" if name == "retnet" else name, kwargs=kwargs, **layer)
    x, pad = tokens(length=7), 3
    ref = m(x, causal=True)
    padded = torch.cat([torch.full((2, pad, 16), float("nan"), dtype=x.dtype), x], dim=1)  # (B, 3+L, d)
    mask = torch.zeros(2, pad + 7, dtype=torch.bool)
    mask[:, :pad] = True
    out = m(padded, key_padding_mask=mask, causal=True)
    assert torch.equal(out[:, :pad], torch.zeros_like(out[:, :pad]))
    torch.testing.assert_close(out[:, pad:], ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", ["softmax", "gla"])
def test_right_padding_nan_reaches_no_gradient(name):
    m, x = mha(name, **ON), tokens(length=6)
    x = x.clone()
    x[1, 4:] = float("nan")
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[1, 4:] = True
    x.requires_grad_(True)
    out = m(x, key_padding_mask=mask, causal=True)
    out.sum().backward()
    assert torch.isfinite(out).all() and (out[1, 4:] == 0).all()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    assert torch.equal(x.grad[1, 4:], torch.zeros_like(x.grad[1, 4:]))


@pytest.mark.parametrize("name", CAUSAL + ["retnet"])
@pytest.mark.parametrize("layer", OPTIONS + [{}])
def test_decode_and_prefill_equal_the_forward(name, layer):
    kwargs = {"rotary": True} if name == "retnet" else None
    m, x = mha("retention" if name == "retnet" else name, kwargs=kwargs, **layer), tokens(length=9)
    ref = m(x, causal=True)
    state, outs = None, []
    for t in range(9):
        out, state = m.decode_step(x[:, t : t + 1], state)
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, 1), ref, rtol=0, atol=1e-10)
    for t in (1, 2, 5):
        out, pre = m.prefill(x[:, :t])
        torch.testing.assert_close(out, ref[:, :t], rtol=0, atol=1e-10)
        step, _ = m.decode_step(x[:, t : t + 1], pre)
        torch.testing.assert_close(step, ref[:, t : t + 1], rtol=0, atol=1e-10)
    if layer.get("short_conv"):
        k = layer["short_conv"]
        assert set(state) == {"core", "conv"} and state["conv"].shape == (2, k - 1, 3 * 16)
        assert set(pre) == {"core", "conv"} and pre["conv"].shape == (2, k - 1, 3 * 16)
    # batch-first: reordering the state reorders the continuation
    swapped = reorder_state(state, torch.tensor([1, 0]))
    nxt = tokens(length=1, seed=5)
    a, _ = m.decode_step(nxt, state)
    b, _ = m.decode_step(nxt.flip(0), swapped)
    torch.testing.assert_close(a.flip(0), b, rtol=0, atol=1e-12)


def test_short_conv_refuses_cross_attention():
    m, x = mha("softmax", short_conv=4), tokens()
    with pytest.raises(ValueError, match="self-attention only"):
        m(x, tokens(length=5))
    with pytest.raises(ValueError, match="self-attention only"):
        m.project_kv(x)
    with pytest.raises(ValueError, match="cross"):
        AttentionSpec("softmax", {}, {"short_conv": 4}).check("cross attention", "cross")
    AttentionSpec("softmax", {}, {"output_gate": True}).check("cross attention", "cross")  # the gate can


def test_bad_layer_options():
    for layer, match in [({"short_cnv": 4}, "short_cnv"), ({"short_conv": -1}, "short_conv"),
                         ({"output_norm": "layernorm"}, "output_norm"), ({"output_gate": "yes"}, "output_gate")]:
        with pytest.raises((ValueError, TypeError), match=match):
            MultiHeadAttention(16, 2, "softmax", **layer)
        with pytest.raises(ValueError, match=match):
            AttentionSpec("softmax", {}, layer).check("attention")


# ----------------------------------------------------------------------------- output norm and gate

def test_output_norm_and_gate_formulas():
    x = tokens(length=5)
    plain, on = mha("linear"), mha("linear", output_norm="groupnorm", output_gate=True)
    with torch.no_grad():
        on.norm_weight.uniform_(0.5, 1.5)
        on.norm_bias.uniform_(-0.5, 0.5)
    split = [p(x).unflatten(-1, (2, 8)).transpose(1, 2) for p in (plain.q_proj, plain.k_proj, plain.v_proj)]
    o = plain.attention(*split, causal=True).transpose(1, 2).flatten(2)  # (B, L, H·D)
    gn = nn.GroupNorm(2, 16, eps=1e-5).double()
    gn.weight.data, gn.bias.data = on.norm_weight.data, on.norm_bias.data
    normed = gn(o.reshape(-1, 16)).reshape(o.shape)  # one group per head, per position
    want = on.out_proj(normed * torch.nn.functional.silu(on.gate_proj(x)))
    torch.testing.assert_close(on(x, causal=True), want, rtol=0, atol=1e-12)

    rms = mha("linear", output_norm="rmsnorm")
    with torch.no_grad():
        rms.norm_weight.uniform_(0.5, 1.5)
    heads = o.unflatten(-1, (2, 8))  # (B, L, H, D)
    normed = heads / (heads.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt() * rms.norm_weight
    torch.testing.assert_close(rms(x, causal=True), rms.out_proj(normed.flatten(2)), rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- rotary retention

def test_rotate_is_torchscale_theta_shift():
    """Pairs (2i, 2i+1) as complex numbers times exp(i·pos·θ_i), θ_i = 10000^(−i/(D/2−1))."""
    x = tokens(1, 6).reshape(1, 1, 6, 16)
    pos = torch.arange(6, dtype=torch.float64)
    theta = torch.tensor([10000.0 ** (-i / 7) for i in range(8)], dtype=torch.float64)
    z = torch.view_as_complex(x.reshape(1, 1, 6, 8, 2).contiguous()) * torch.polar(
        torch.ones(6, 8, dtype=torch.float64), pos[:, None] * theta)
    torch.testing.assert_close(rotate(x, pos), torch.view_as_real(z).flatten(-2), rtol=0, atol=1e-12)


def test_rotary_scores_are_relative():
    q, k = tokens(1, 4).reshape(1, 1, 4, 16), tokens(1, 4, seed=3).reshape(1, 1, 4, 16)
    pos = torch.arange(4, dtype=torch.float64)
    a = rotate(q, pos) @ rotate(k, pos).transpose(-1, -2)
    b = rotate(q, pos + 11) @ rotate(k, pos + 11).transpose(-1, -2)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    assert not torch.allclose(a, q @ k.transpose(-1, -2))
    with pytest.raises(ValueError, match="even"):
        MultiHeadAttention(15, 3, "retention", {"rotary": True})


# ----------------------------------------------------------------------------- configs, labels, training

def test_config_layer_override_label_and_two_step_training(tmp_path):
    from efficient_attn_tasks.config.checks import check_config
    from efficient_attn_tasks.config.labels import attention_config, attention_label, config_label
    from efficient_attn_tasks.config.schema import attention_spec
    from efficient_attn_tasks.run.fit import run
    from tests.helpers import tiny_cfg

    cfg = tiny_cfg("mqar", "gla", "attention.layer.short_conv=4", "trainer.max_steps=2", "test=false")
    check_config(cfg)
    paper = {"output_norm": "rmsnorm", "output_gate": True}  # configs/attention/gla.yaml: the paper's layer
    assert attention_spec(cfg, "decoder") == AttentionSpec("gla", {}, {"short_conv": 4, **paper})
    assert attention_label(cfg) == attention_config(cfg) == "gla+conv4"
    assert config_label("gla", "gla", cfg.attention.layer) == "gla+conv4"
    plain = tiny_cfg("mqar", "gla")
    check_config(plain)
    assert attention_label(plain) == attention_config(plain) == "gla"
    assert attention_spec(plain, "decoder").layer == paper
    record = run(cfg, tmp_path)
    assert record.steps == 2 and record.attention == "gla+conv4"


def test_retnet_config_and_labels():
    from efficient_attn_tasks.config.checks import check_config
    from efficient_attn_tasks.config.labels import attention_config
    from efficient_attn_tasks.config.schema import attention_spec
    from tests.helpers import tiny_cfg

    cfg = tiny_cfg("mqar", "retnet")
    check_config(cfg)
    assert attention_spec(cfg, "decoder") == AttentionSpec(
        "retention", {"rotary": True}, {"output_norm": "groupnorm", "output_gate": True})
    assert attention_config(cfg) == "retnet"
    assert attention_config(tiny_cfg("mqar", "retnet", "attention.layer.output_gate=false")) == "retnet+nogate"
    bare = tiny_cfg("mqar", "retention")
    assert attention_spec(bare, "decoder") == AttentionSpec("retention", {}, {})


def test_unknown_layer_key_is_a_clear_error():
    from efficient_attn_tasks.config.checks import ConfigError, check_config
    from tests.helpers import tiny_cfg

    with pytest.raises(ConfigError, match=r"unknown layer option\(s\) \['short_cnv'\]"):
        check_config(tiny_cfg("mqar", "gla", "+attention.layer.short_cnv=4"))
    with pytest.raises(ConfigError, match="short_conv"):
        check_config(tiny_cfg("translation", "softmax", "attention.layer.short_conv=4"))  # its cross-attention


def test_run_dir_label_names_the_layer_options():
    from omegaconf import OmegaConf

    import efficient_attn_tasks.config.labels  # noqa: F401  (registers the resolver)

    node = OmegaConf.create({"attention": {"name": "linear", "config": "linear", "layer": {"short_conv": 4}},
                             "d": "${attention_label:${attention.name},${attention.config},${attention.layer}}"})
    assert node.d == "linear+conv4"
