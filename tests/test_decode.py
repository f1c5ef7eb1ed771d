"""Incremental decoding: stepping through a sequence reproduces the full causal forward."""

import pytest
import torch

import efficient_attn as ea

from .conftest import decode_sequence, make_qkv, skip_unsupported


@pytest.mark.parametrize("name", ea.list_attentions())
def test_step_by_step_equals_causal_forward(name):
    torch.manual_seed(1)
    attn = ea.create_attention(name, head_dim=8, num_heads=2).double().eval()
    q, k, v = make_qkv(b=2, h=2, length=13, d=8, dv=5)
    full = attn(q, k, v, causal=True)
    stepped = decode_sequence(attn, q, k, v)
    torch.testing.assert_close(stepped, full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("prefix", [1, 3, 5, 9])
@pytest.mark.parametrize("name", ea.list_attentions())
def test_prefill_equals_stepping(name, prefix):
    """``prefill`` of the first t positions gives the state t steps give, and decoding from it
    continues the causal forward (window 4 in the test: t = 1, 3 < w, with 3 > w/2, and 5, 9 > w)."""
    torch.manual_seed(2)
    kwargs = {"window": 4} if name == "sliding_window" else {}
    attn = ea.create_attention(name, head_dim=8, num_heads=2, **kwargs).double().eval()
    q, k, v = make_qkv(b=2, h=2, length=13, d=8, dv=5, scale=2.0)
    state = attn.prefill(k[:, :, :prefix], v[:, :, :prefix])
    stepped = None
    for t in range(prefix):
        _, stepped = attn.decode_step(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], stepped)
    assert state.keys() == stepped.keys()
    for key in state:
        torch.testing.assert_close(state[key], stepped[key], rtol=1e-10, atol=1e-12)
    rows = []
    for t in range(prefix, 13):
        out, state = attn.decode_step(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], state)
        rows.append(out)
    full = attn(q, k, v, causal=True)[:, :, prefix:]
    torch.testing.assert_close(torch.cat(rows, dim=2), full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ea.list_attentions())
def test_prefill_rejects_inputs_that_do_not_fit_the_module(name):
    """``prefill`` checks its keys and values as the forward does: a wrong head count or head size, or
    keys and values of different lengths, raise instead of building a state of the wrong shape."""
    attn = ea.create_attention(name, head_dim=8, num_heads=2).double().eval()
    _, k, v = make_qkv(b=2, h=2, length=5, d=8, dv=5)
    _, k3, v3 = make_qkv(b=2, h=3, length=5, d=8, dv=5)
    for bad_k, bad_v in ((k3, v3), (k[..., :6], v), (k, v[:, :, :4])):
        with pytest.raises(ValueError):
            attn.prefill(bad_k, bad_v)


@pytest.mark.parametrize("name", ["favor", "linear"])
def test_kernel_state_is_constant_size(name):
    attn = ea.create_attention(name, head_dim=8, num_heads=2)
    q, k, v = make_qkv(b=1, h=2, length=6, d=8, dtype=torch.float32)
    state = None
    for t in range(6):
        _, state = attn.decode_step(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], state)
        assert state["kv"].shape[-1] == 9  # (B, H, M, Dv+1) at every t
        assert set(state) == ({"kv", "log_scale"} if name == "favor" else {"kv"})
        if name == "favor":  # the running maximum key log-scale G_t, one number per (batch, head)
            assert state["log_scale"].shape == (1, 2, 1, 1)


def test_decoding_never_redraws_features():
    attn = ea.create_attention("favor", head_dim=8, num_heads=2, redraw_interval=1).train()
    before = attn.projection.clone()
    q, k, v = make_qkv(b=1, h=2, length=4, d=8, dtype=torch.float32)
    state = None
    for t in range(4):
        _, state = attn.decode_step(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], state)
    assert torch.equal(attn.projection, before)


@pytest.mark.parametrize("name", ea.list_attentions())
def test_step_takes_one_position(name):
    attn = ea.create_attention(name, head_dim=8, num_heads=2)
    q, k, v = make_qkv(b=1, h=2, length=3, d=8, dtype=torch.float32)
    with pytest.raises(ValueError, match="one position"):
        attn.decode_step(q, k, v)


@pytest.mark.parametrize("name", ea.list_attentions())
def test_cached_memory_equals_cross_attention(name):
    """cache_memory + attend_memory (decoding's cross-attention) == forward over the same keys."""
    attn = ea.create_attention(name, head_dim=8, num_heads=2).double().eval()
    q, k, v = make_qkv(b=2, h=2, length=3, s=7, d=8)
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[1, 4:] = True
    skip_unsupported(name, lambda: attn.cache_memory(k, v, mask), cross=True)
    cached = attn.attend_memory(q, attn.cache_memory(k, v, mask))
    torch.testing.assert_close(cached, attn(q, k, v, key_padding_mask=mask), rtol=0, atol=1e-12)


def test_prefill_fallback_steps_through_the_prefix():
    """A variant with its own ``decode_step`` but no ``prefill`` gets the stepped state, not a raw cache."""
    from efficient_attn.attention.base import Attention
    from efficient_attn.attention.sliding_window import SlidingWindowAttention

    class NoPrefill(SlidingWindowAttention):
        prefill = Attention.prefill

    attn = NoPrefill(8, 2, window=3).double()
    _, k, v = make_qkv(b=1, h=2, length=7, d=8)
    state = attn.prefill(k, v)
    torch.testing.assert_close(state["k"], k[:, :, -3:], rtol=0, atol=0)
