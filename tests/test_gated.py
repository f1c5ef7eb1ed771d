"""The token-gated recurrences (gla, mamba2, deltanet, gated_deltanet) and their kernels in efficient_attn.ops.

The chunked kernels equal the per-token loops in float64 across chunk boundaries, with exact gradients;
float32 at long L with strong gates stays close to float64 (gates multiply in log space); decoding and
prefill continue the forward; the gates read the token input x; padding leaves the state untouched.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import efficient_attn as ea
from efficient_attn.ops.delta import chunked_delta_with_state, delta_recurrence_with_state
from efficient_attn.ops.gated import chunked_gated_with_state, gated_recurrence_with_state

GATED = ["gla", "mamba2", "deltanet", "gated_deltanet"]


def _inputs(length: int, d: int = 6, e: int = 5, dtype=torch.float64, seed: int = 0, gate_scale: float = 0.5):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(2, 3, length, d, generator=g, dtype=dtype) for _ in range(2))
    v = torch.randn(2, 3, length, e, generator=g, dtype=dtype)
    log_gate = F.logsigmoid(torch.randn(2, 3, length, d, generator=g, dtype=dtype)) * gate_scale
    beta = torch.sigmoid(torch.randn(2, 3, length, generator=g, dtype=dtype))
    return q, k, v, log_gate, beta


@pytest.mark.parametrize(
    "length, chunk", [(1, 4), (13, 4), (13, 5), (16, 16), (37, 8), (37, 64), (70, 32), (150, 48), (150, 64)]
)
@pytest.mark.parametrize("channels", ["per_channel", "scalar"])
@pytest.mark.parametrize("gate_scale", [0.5, 8.0], ids=["mild", "strong"])
def test_chunked_gated_equals_recurrence(length, chunk, channels, gate_scale):
    """Chunks of a power of two or not (padded inside); gates mild or strong (8: products of e^−100 and less
    inside a chunk)."""
    q, k, v, log_gate, _ = _inputs(length, gate_scale=gate_scale)
    if channels == "scalar":
        log_gate = log_gate[..., :1]  # (B, H, L, 1)
    out, state = chunked_gated_with_state(q, k, v, log_gate, chunk)
    want, want_state = gated_recurrence_with_state(q, k, v, log_gate)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(state, want_state, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("chunk", [64, 48])
def test_float32_strong_per_channel_gates_stay_finite(chunk):
    """Log gates of −8 per step on half the channels: e^{b_i − b_j} spans e^0 to e^−512 inside a chunk of 64
    (below float32's range from 12 rows apart); no factor overflows, in a whole chunk or one padded to a power
    of two (48 -> 64): finite and equal to float64, gradients too."""
    q, k, v, log_gate, _ = _inputs(256, d=8, e=4, seed=5)
    log_gate[..., :4] = -8.0
    want = gated_recurrence_with_state(q, k, v, log_gate)[0]
    args = [t.float().requires_grad_() for t in (q, k, v, log_gate)]
    got = chunked_gated_with_state(*args, chunk)[0]
    assert got.isfinite().all()
    assert (got.double() - want).abs().max() / want.abs().max() < 1e-5
    got.square().sum().backward()
    assert all(a.grad.isfinite().all() for a in args)


@pytest.mark.parametrize("length, chunk", [(1, 4), (13, 4), (13, 5), (16, 16), (37, 8), (37, 64)])
@pytest.mark.parametrize("gated", [False, True])
def test_chunked_delta_equals_recurrence(length, chunk, gated):
    q, k, v, log_gate, beta = _inputs(length)
    k = F.normalize(k, dim=-1)
    log_gate = log_gate[..., 0] if gated else None  # (B, H, L)
    out, state = chunked_delta_with_state(q, k, v, beta, log_gate, chunk)
    want, want_state = delta_recurrence_with_state(q, k, v, beta, log_gate)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(state, want_state, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("gate_scale", [0.5, 8.0], ids=["mild", "strong"])
def test_gradcheck_across_chunk_boundaries(gate_scale):
    """Gradients of every input (gates and β included) through chunks of 3 (padded to 4 inside) over L = 8."""
    q, k, v, log_gate, beta = (t.requires_grad_() for t in _inputs(8, d=3, e=2, gate_scale=gate_scale))
    assert torch.autograd.gradcheck(lambda *a: chunked_gated_with_state(*a, 3)[0], (q, k, v, log_gate))
    assert torch.autograd.gradcheck(lambda *a: chunked_gated_with_state(*a, 3)[0], (q, k, v, log_gate[..., :1]))
    kn = F.normalize(k, dim=-1)
    assert torch.autograd.gradcheck(lambda q, k, v, b, g: chunked_delta_with_state(q, k, v, b, g, 3)[0],
                                    (q, kn, v, beta, log_gate[..., 0]))


@pytest.mark.parametrize("kind", ["gated", "scalar", "delta", "gated_delta"])
def test_float32_long_sequence_strong_gates_match_float64(kind):
    """L = 2048 with gates whose products underflow float32 within a few tokens (log gate ≈ −3 per step and
    channel, −0.01 on some): the float32 kernel stays finite and equal to float64 to float32's precision."""
    q, k, v, log_gate, beta = _inputs(2048, d=8, e=4, gate_scale=6.0, seed=3)
    log_gate[:, :, :, :2] = -0.01  # slow channels: long memory mixed with fast forgetting
    if kind == "gated":
        args, fn = (log_gate,), lambda *a: chunked_gated_with_state(*a, 64)[0]
    elif kind == "scalar":
        args, fn = (log_gate[..., 2:3],), lambda *a: chunked_gated_with_state(*a, 64)[0]
    else:
        k = F.normalize(k, dim=-1)
        gate = log_gate[..., 2] if kind == "gated_delta" else None
        args, fn = (beta, gate), lambda q, k, v, b, g: chunked_delta_with_state(q, k, v, b, g, 64)[0]
    want = fn(q, k, v, *args)
    got = fn(*(t.float() for t in (q, k, v)), *(None if a is None else a.float() for a in args))
    assert got.isfinite().all()
    err = (got.double() - want).abs().max() / want.abs().max()
    assert err < 1e-5, err.item()


@pytest.mark.parametrize("name", GATED)
def test_gates_read_the_token_input(name):
    """Through MultiHeadAttention the gates come from x (the layer input), not from the keys."""
    torch.manual_seed(0)
    attn = ea.create_attention(name, head_dim=4, num_heads=2, model_dim=6).double()
    q, k, v = (torch.randn(1, 2, 9, 4, dtype=torch.float64) for _ in range(3))
    x = torch.randn(1, 9, 6, dtype=torch.float64)
    out = attn(q, k, v, causal=True, x=x)
    x2 = x.clone()
    x2[:, 5] += 1.0  # another token at position 5: rows 0-4 keep their outputs, row 5 moves
    out2 = attn(q, k, v, causal=True, x=x2)
    torch.testing.assert_close(out2[:, :, :5], out[:, :, :5], rtol=0, atol=0)
    assert (out2[:, :, 5] - out[:, :, 5]).abs().max() > 1e-6
    with pytest.raises(ValueError, match="model_dim"):
        attn(q, k, v, causal=True)  # model_dim 6 ≠ H·D 8: the keys cannot stand in for x


def test_variants_without_token_input_refuse_x():
    attn = ea.create_attention("linear", head_dim=4, num_heads=2)
    q = torch.randn(1, 2, 5, 4)
    with pytest.raises(ValueError, match="no per-token input"):
        attn(q, q, q, causal=True, x=torch.randn(1, 5, 8))


@pytest.mark.parametrize("name", GATED)
def test_wrapper_decode_and_prefill_continue_the_forward(name):
    """MultiHeadAttention (x = the layer input): steps, and prefill of 10 then steps, equal the causal forward."""
    torch.manual_seed(0)
    mha = ea.MultiHeadAttention(12, 3, name, {"chunk_size": 4}).double()
    x = torch.randn(2, 23, 12, dtype=torch.float64)
    want = mha(x, causal=True)
    state, rows = None, []
    for t in range(23):
        out, state = mha.decode_step(x[:, t : t + 1], state)
        rows.append(out)
    torch.testing.assert_close(torch.cat(rows, 1), want, rtol=1e-10, atol=1e-12)
    out, state = mha.prefill(x[:, :10])
    torch.testing.assert_close(out, want[:, :10], rtol=1e-10, atol=1e-12)
    for t in range(10, 23):
        out, state = mha.decode_step(x[:, t : t + 1], state)
        torch.testing.assert_close(out, want[:, t : t + 1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", GATED)
def test_left_padding_gives_the_unpadded_outputs(name):
    """Padded positions leave the state as it was: a left-padded sequence (padding holding NaN) outputs,
    at its real positions, exactly what the sequence alone outputs; padded rows are zero."""
    torch.manual_seed(0)
    mha = ea.MultiHeadAttention(12, 3, name, {"chunk_size": 4}).double()
    x = torch.randn(1, 11, 12, dtype=torch.float64)
    padded = torch.cat([torch.full((1, 4, 12), float("nan"), dtype=torch.float64), x], dim=1)  # (1, 15, 12)
    mask = torch.zeros(1, 15, dtype=torch.bool)
    mask[:, :4] = True
    got = mha(padded, key_padding_mask=mask, causal=True)
    torch.testing.assert_close(got[:, 4:], mha(x, causal=True), rtol=1e-10, atol=1e-12)
    assert (got[:, :4] == 0).all()


@pytest.mark.parametrize("name", GATED)
def test_refused_as_encoder_and_cross_attention(name):
    spec = ea.transformer.AttentionSpec(name)
    for site in ("encoder", "cross"):
        with pytest.raises(ValueError, match="causal-only"):
            spec.check("model", site)
    spec.check("model", "decoder")


@pytest.mark.parametrize("name", GATED)
def test_wrapper_feeds_the_layer_input_as_x(name):
    """MultiHeadAttention's core reads the layer input (B, L, d_model) as x, not the keys."""
    torch.manual_seed(0)
    mha = ea.MultiHeadAttention(12, 3, name).double()
    x = torch.randn(2, 9, 12, dtype=torch.float64)
    q, k, v = (proj(x).unflatten(-1, (3, 4)).transpose(1, 2) for proj in (mha.q_proj, mha.k_proj, mha.v_proj))
    core = mha.attention(q, k, v, causal=True, x=x)  # (B, H, L, D)
    torch.testing.assert_close(mha(x, causal=True), mha.out_proj(core.transpose(1, 2).flatten(2)))


def test_plain_forms_return_the_outputs():
    """The public forms without state return (B, H, L, E), the outputs of their ``*_with_state`` forms."""
    from efficient_attn.ops.delta import chunked_delta, delta_recurrence
    from efficient_attn.ops.gated import chunked_gated, gated_recurrence

    q, k, v, log_gate, beta = _inputs(11)
    k = F.normalize(k, dim=-1)
    want = gated_recurrence_with_state(q, k, v, log_gate)[0]
    for got in (gated_recurrence(q, k, v, log_gate), chunked_gated(q, k, v, log_gate, 4)):
        assert got.shape == (2, 3, 11, 5)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    want = delta_recurrence_with_state(q, k, v, beta, log_gate[..., 0])[0]
    for got in (delta_recurrence(q, k, v, beta, log_gate[..., 0]), chunked_delta(q, k, v, beta, log_gate[..., 0], 4)):
        assert got.shape == (2, 3, 11, 5)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", GATED)
def test_initialisation_follows_the_papers(name):
    """Gate projections start as nn.Linear does (uniform in ±1/√fan_in); Mamba-2's decay starts with
    A = exp(A_log) in [1, 16] and dt = softplus(dt_bias) in [1e-3, 0.1]."""
    torch.manual_seed(0)
    attn = ea.create_attention(name, head_dim=16, num_heads=64, model_dim=256)
    for param_name in ("gate_down", "gate_up", "dt_proj", "beta_proj"):
        weight = getattr(attn, param_name, None)
        if weight is not None:
            bound = 1.0 / weight.shape[1] ** 0.5
            assert weight.abs().max() <= bound and weight.abs().max() > 0.97 * bound, param_name
    if hasattr(attn, "a_log"):
        a, dt = attn.a_log.exp(), F.softplus(attn.dt_bias)
        assert ((a >= 1.0) & (a <= 16.0)).all() and a.max() - a.min() > 10
        assert ((dt >= 1e-3 * (1 - 1e-5)) & (dt <= 0.1 * (1 + 1e-5))).all() and dt.max() / dt.min() > 20
