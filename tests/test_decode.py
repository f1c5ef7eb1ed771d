"""Incremental decoding: stepping through a sequence reproduces the full causal forward."""

import pytest
import torch

import efficient_attn as ea
from efficient_attn.transformer import reorder_state

from .helpers import decode_sequence, make_qkv, skip_unsupported

# decoding fixes cosFormer's M before the length is known: max_len = 13 = L gives the default forward's M
DECODE_KWARGS = {"cosformer": {"max_len": 13}}


@pytest.mark.parametrize("name", ea.list_attentions())
def test_step_by_step_equals_causal_forward(name):
    torch.manual_seed(1)
    attn = ea.create_attention(name, head_dim=8, num_heads=2, **DECODE_KWARGS.get(name, {})).double().eval()
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
    kwargs = {"window": 4} if name == "sliding_window" else DECODE_KWARGS.get(name, {})
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
    attn = ea.create_attention(name, head_dim=8, num_heads=2, **DECODE_KWARGS.get(name, {})).double().eval()
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


# ----------------------------------------------------------------------------- the key/value cache
def _step_all(attn, q, k, v, state, start, stop):
    rows = []
    for t in range(start, stop):
        out, state = attn.decode_step(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], state)
        rows.append(out)
    return torch.cat(rows, dim=2), state  # (B, H, stop - start, Dv)


def test_kv_cache_grows_in_place_with_few_copies():
    """The softmax cache writes each step into spare capacity: over 200 steps its buffer is
    reallocated O(log t) times (×1.5 growth), not every step as ``torch.cat`` did, and the
    state still holds exactly the t keys/values so far."""
    attn = ea.create_attention("softmax", head_dim=4, num_heads=2).double().eval()
    q, k, v = make_qkv(b=1, h=2, length=200, d=4, dv=3)
    state, buffers = None, set()
    with torch.no_grad():
        for t in range(200):
            _, state = attn.decode_step(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], state)
            buffers.add(state["k"].data_ptr())
            assert state["k"].shape[2] == t + 1
    assert len(buffers) <= 12, f"{len(buffers)} buffers for 200 steps: the cache is copied too often"
    torch.testing.assert_close(state["k"], k, rtol=0, atol=0)
    torch.testing.assert_close(state["v"], v, rtol=0, atol=0)


def test_kv_cache_branches_from_one_state_without_aliasing():
    """Two continuations of one prefix (sampling twice from a prompt) must not write into each
    other's cache: the second step from the same state gets its own buffer."""
    torch.manual_seed(3)
    attn = ea.create_attention("softmax", head_dim=8, num_heads=2).double().eval()
    q, k, v = make_qkv(b=2, h=2, length=12, d=8, dv=5)
    q2, k2, v2 = make_qkv(b=2, h=2, length=12, d=8, dv=5)  # another continuation
    with torch.no_grad():
        _, prompt = _step_all(attn, q, k, v, None, 0, 6)
        out_a, state_a = _step_all(attn, q, k, v, prompt, 6, 11)
        out_b, state_b = _step_all(attn, q2, k2, v2, prompt, 6, 12)  # a second branch from the same prompt state
        last_a, state_a = _step_all(attn, q, k, v, state_a, 11, 12)  # the first branch goes on after it
        again_a, _ = _step_all(attn, q, k, v, prompt, 6, 12)  # and the first branch again, from the prompt
    out_a = torch.cat([out_a, last_a], dim=2)
    torch.testing.assert_close(state_a["k"], k, rtol=0, atol=0)
    kb, vb = torch.cat([k[:, :, :6], k2[:, :, 6:]], 2), torch.cat([v[:, :, :6], v2[:, :, 6:]], 2)
    qb = torch.cat([q[:, :, :6], q2[:, :, 6:]], 2)
    torch.testing.assert_close(out_a, attn(q, k, v, causal=True)[:, :, 6:], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out_b, attn(qb, kb, vb, causal=True)[:, :, 6:], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(again_a, out_a, rtol=0, atol=0)


def test_kv_cache_after_beam_reordering():
    """Reordering a cache (beam search's index_select) and continuing equals decoding the
    reordered sequences from scratch."""
    torch.manual_seed(4)
    attn = ea.create_attention("softmax", head_dim=8, num_heads=2).double().eval()
    q, k, v = make_qkv(b=3, h=2, length=10, d=8, dv=5)
    order = torch.tensor([2, 0, 0])
    with torch.no_grad():
        _, state = _step_all(attn, q, k, v, None, 0, 5)
        state = reorder_state(state, order)
        qr, kr, vr = q[order], k[order], v[order]
        out, _ = _step_all(attn, qr, kr, vr, state, 5, 10)
    torch.testing.assert_close(out, attn(qr, kr, vr, causal=True)[:, :, 5:], rtol=1e-10, atol=1e-10)


def test_kv_cache_decoding_keeps_gradients():
    """With autograd on, decoding never writes into a tensor it recorded: gradients through the
    steps equal those of the causal forward, also when the prompt's cache was built without grad."""
    torch.manual_seed(5)
    attn = ea.create_attention("softmax", head_dim=8, num_heads=2).double()
    q, k, v = (t.requires_grad_() for t in make_qkv(b=1, h=2, length=10, d=8, dv=5))
    with torch.no_grad():
        _, prompt = _step_all(attn, q, k, v, None, 0, 3)
    for start, state in ((0, None), (3, prompt)):
        out, _ = _step_all(attn, q, k, v, state, start, 10)
        grads = torch.autograd.grad(out.pow(2).sum(), (q, k, v), allow_unused=True)
        ref = torch.autograd.grad(attn(q, k, v, causal=True)[:, :, start:].pow(2).sum(), (q, k, v))
        for g, r in zip(grads, ref):
            if start:  # the prompt's keys/values were cached without grad: compare the later positions
                g, r = g[:, :, start:], r[:, :, start:]
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)
