"""Based's Taylor attention: the feature map is the 2nd-order Taylor expansion of exp, low precision
at large norms, causality bit for bit, and gradients across chunk boundaries."""

import math
from functools import partial

import pytest
import torch

import efficient_attn as ea

from .helpers import (
    assert_bf16_close_to_float64,
    assert_causal_rows_ignore_the_future,
    assert_reset_random_is_seeded,
    assert_same_grads,
    decode_sequence,
    make_qkv,
)
from .test_reference import reference


def build(d=8, h=2, dtype=torch.float64, **kwargs):
    torch.manual_seed(1)
    return ea.create_attention("taylor", head_dim=d, num_heads=h, **kwargs).to(dtype).eval()


@pytest.mark.parametrize("feature_dim", [1, 3, 16])
def test_features_give_the_taylor_expansion_of_exp(feature_dim):
    """φ(q̃)·φ(k̃) = 1 + t + t²/2, t = q̃·k̃/√d', for every pair (float64); M = 1 + d' + d'²."""
    attn = build(feature_dim=feature_dim)
    q, k, _ = make_qkv(b=2, h=2, length=6, s=5, d=8, scale=2.0)
    phi_q, scale_q = attn.feature_map(q, is_query=True)
    phi_k, scale_k = attn.feature_map(k, is_query=False)
    assert scale_q is None and scale_k is None
    assert phi_q.shape == (2, 2, 6, 1 + feature_dim + feature_dim**2)
    q_low = torch.einsum("bhld,hde->bhle", q, attn.weight)  # (B, H, L, d'): q̃ = q W_h
    k_low = torch.einsum("bhsd,hde->bhse", k, attn.weight)  # (B, H, S, d')
    t = q_low @ k_low.transpose(-1, -2) / math.sqrt(feature_dim)  # (B, H, L, S): q̃·k̃/√d'
    torch.testing.assert_close(phi_q @ phi_k.transpose(-1, -2), 1 + t + t**2 / 2, rtol=1e-12, atol=1e-12)
    assert (phi_q @ phi_k.transpose(-1, -2)).min() >= 0.5  # ((1 + t)² + 1)/2 ≥ 1/2


def test_bad_feature_dim_raises():
    for bad in (0, -2, 2.0):
        with pytest.raises(ValueError, match="feature_dim"):
            ea.create_attention("taylor", head_dim=8, num_heads=2, feature_dim=bad)


@pytest.mark.parametrize("causal", [False, True])
def test_bf16_at_large_norms_matches_float64(causal):
    """bf16 module and inputs at 6× unit norms (t = q̃·k̃/√d' with std ~ 150) against float64 on the same
    rounded inputs and weights. Features and sums run in fp32, so what is left is rounding the output
    to bf16 (≤ 2^-9 relative, and |out| ≤ max|v|: a convex combination); the bound 2^-8·max|v|
    leaves the fp32 sums a factor 2."""
    attn = build(d=64, dtype=torch.float32).to(torch.bfloat16)
    assert_bf16_close_to_float64(attn, partial(reference, "taylor"), 6.0, causal)


def test_perturbing_the_future_leaves_the_past_bit_identical():
    attn = build(chunk_size=4)
    q, k, v = make_qkv(b=2, h=2, length=13, d=8)
    assert_causal_rows_ignore_the_future(attn, q, k, v, (0, 3, 4, 9))  # inside a chunk and at its last row


@pytest.mark.parametrize("chunk", [4, 5])
def test_gradients_across_chunks_match_float64_reference(chunk):
    """L = 13 > chunk: the hand-written chunked backward (state carried across chunk boundaries) gives
    the gradients of the plain float64 formula for q, k, v and the projection W."""
    attn = build(chunk_size=chunk)
    q, k, v = (t.requires_grad_() for t in make_qkv(b=2, h=2, length=13, d=8, dv=5))
    mask = torch.zeros(2, 13, dtype=torch.bool)
    mask[1, :2] = True
    assert_same_grads(
        lambda: attn(q, k, v, key_padding_mask=mask, causal=True),
        lambda: reference("taylor", attn, q, k, v, mask, causal=True),
        (q, k, v), [attn.weight],
    )


def test_decoding_state_is_constant_size_and_equals_the_causal_forward():
    attn = build(feature_dim=4)
    q, k, v = make_qkv(b=1, h=2, length=9, d=8, dv=3)
    state = None
    for t in range(9):
        _, state = attn.decode_step(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], state)
        assert set(state) == {"kv"} and state["kv"].shape == (1, 2, 1 + 4 + 16, 3 + 1)
    torch.testing.assert_close(decode_sequence(attn, q, k, v), attn(q, k, v, causal=True), rtol=1e-12, atol=1e-12)


def test_projection_is_seeded_per_module_and_leaves_the_global_rng():
    attn = build()
    assert_reset_random_is_seeded(attn, lambda a: a.weight)
