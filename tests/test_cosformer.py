"""cosFormer: the cos/sin decomposition equals the cos-weighted formula, low precision at large norms,
causality bit for bit, gradients across chunk boundaries, max_len, zero normalizers and decoding."""

import math
from functools import partial

import pytest
import torch

import efficient_attn as ea

from .helpers import (
    assert_bf16_close_to_float64,
    assert_causal_rows_ignore_the_future,
    assert_same_grads,
    decode_sequence,
    make_qkv,
)
from .test_reference import reference


def build(d=8, h=2, dtype=torch.float64, **kwargs):
    return ea.create_attention("cosformer", head_dim=d, num_heads=h, **kwargs).to(dtype).eval()


@pytest.mark.parametrize(
    "length, s, max_len",
    [(n, m, max_len) for n, m in [(13, 13), (5, 11), (11, 4)] for max_len in (13, 40, 1024)] + [(13, 13, None)],
)
def test_decomposition_equals_the_cos_weighted_formula(length, s, max_len):
    """[φ cos θ_i, φ sin θ_i]·[φ cos θ_j, φ sin θ_j] = φ(q_i)·φ(k_j) cos(π/2·(i − j)/M), float64
    (max_len None: M = the rows passed, queries and keys of one length L)."""
    attn = build(max_len=max_len, kernel_eps=0.01)
    q, k, _ = make_qkv(b=2, h=2, length=length, s=s, d=8)
    phi_q, _ = attn.feature_map(q, is_query=True)  # (B, H, L, 2D)
    phi_k, _ = attn.feature_map(k, is_query=False)  # (B, H, S, 2D)
    assert phi_q.shape == (2, 2, length, 16) and (phi_q >= 0).all() and (phi_k >= 0).all()
    i = torch.arange(length, dtype=torch.float64)[:, None]
    j = torch.arange(s, dtype=torch.float64)[None, :]
    relu = (torch.relu(q) + 0.01) @ (torch.relu(k) + 0.01).transpose(-1, -2)  # (B, H, L, S)
    direct = relu * torch.cos(math.pi / 2 * (i - j) / (max_len or length))
    torch.testing.assert_close(phi_q @ phi_k.transpose(-1, -2), direct, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("causal", [False, True])
def test_bf16_at_large_norms_matches_float64(causal):
    """bf16 inputs at 8× unit norms against float64 on the same rounded inputs. Features and sums run
    in fp32 (all terms ≥ 0: no cancellation), so what is left is rounding the output to bf16
    (≤ 2^-9 relative, and |out| ≤ max|v|: a convex combination); 2^-8·max|v| leaves fp32 a factor 2."""
    attn = build(d=64, dtype=torch.bfloat16, max_len=128)
    assert_bf16_close_to_float64(attn, partial(reference, "cosformer"), 8.0, causal)


def test_perturbing_the_future_leaves_the_past_bit_identical():
    attn = build(chunk_size=4, max_len=16)
    q, k, v = make_qkv(b=2, h=2, length=13, d=8)
    assert_causal_rows_ignore_the_future(attn, q, k, v, (0, 3, 4, 9))  # inside a chunk and at its last row


@pytest.mark.parametrize("chunk", [4, 5])
def test_gradients_across_chunks_match_float64_reference(chunk):
    """L = 13 > chunk, M = 16 (strong re-weighting): the chunked backward gives the gradients of the
    plain float64 formula for q, k and v."""
    attn = build(chunk_size=chunk, max_len=16)
    q, k, v = (t.requires_grad_() for t in make_qkv(b=2, h=2, length=13, d=8, dv=5))
    mask = torch.zeros(2, 13, dtype=torch.bool)
    mask[1, :2] = True
    assert_same_grads(
        lambda: attn(q, k, v, key_padding_mask=mask, causal=True),
        lambda: reference("cosformer", attn, q, k, v, mask, causal=True),
        (q, k, v),
    )


def test_decoding_keeps_a_constant_state_and_its_position():
    attn = build(max_len=16)
    q, k, v = make_qkv(b=1, h=2, length=9, d=8, dv=3)
    state = None
    for t in range(9):
        _, state = attn.decode_step(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], state)
        assert set(state) == {"kv", "position"} and state["position"] == t + 1
        assert state["kv"].shape == (1, 2, 2 * 8, 3 + 1)
    torch.testing.assert_close(decode_sequence(attn, q, k, v), attn(q, k, v, causal=True), rtol=1e-12, atol=1e-12)


def test_positions_beyond_max_len_raise():
    attn = build(max_len=5)
    q, k, v = make_qkv(b=1, h=2, length=6, d=8)
    attn(q[:, :, :5], k[:, :, :5], v[:, :, :5], causal=True)  # |i − j| ≤ 4 < M: fine
    with pytest.raises(ValueError, match="max_len=5"):
        attn(q, k, v, causal=True)
    with pytest.raises(ValueError, match="max_len=5"):
        decode_sequence(attn, q, k, v)  # the 6th step
    for bad in ({"max_len": 0}, {"max_len": 2.0}, {"kernel_eps": -1.0}):
        with pytest.raises(ValueError):
            ea.create_attention("cosformer", head_dim=8, num_heads=2, **bad)


@pytest.mark.parametrize("causal", [False, True])
def test_zero_normalizer_without_eps_gives_zeros_not_nan(causal):
    """kernel_eps=0: a query with only negative entries has ReLU(q) = 0, so every weight is 0; its
    output (and gradient) is 0, never NaN. With the default ε the same row is a proper average."""
    q, k, v = make_qkv(b=1, h=2, length=6, d=8)
    q[0, 0, 3] = -q[0, 0, 3].abs() - 0.1
    q.requires_grad_()
    out = build(kernel_eps=0.0)(q, k, v, causal=causal)
    assert out.isfinite().all() and (out[0, 0, 3] == 0).all() and (out[0, 1, 3] != 0).all()
    out.sum().backward()
    assert q.grad.isfinite().all()
    const = torch.full_like(v, 2.5)
    torch.testing.assert_close(build()(q, k, const, causal=causal), const[:, :, :6], rtol=1e-12, atol=1e-12)


def test_cross_attention_is_refused():
    """Relative positions need queries and keys in one sequence: S != L and cached memory raise."""
    attn = build(max_len=16)
    q, k, v = make_qkv(b=2, h=2, length=7, s=9, d=8, dv=3)
    with pytest.raises(ValueError, match="self-attention only"):
        attn(q, k, v)
    with pytest.raises(ValueError, match="self-attention only"):
        attn.cache_memory(k, v)


@pytest.mark.parametrize("length", [8, 64])
@pytest.mark.parametrize("causal", [False, True])
def test_default_horizon_is_the_sequence_length(length, causal):
    """max_len None (the default): M = L, as the official code's m = max(src_len, tgt_len), so the weight
    at the largest distance L − 1 is cos(π/2·(L−1)/L) whatever L (0.20 at L = 8, 0.025 at L = 64), not
    ~1 as a fixed M = 1024 would give; the output is that of max_len = L and differs from max_len = 1024."""
    attn = build()
    assert attn.max_len is None
    q, k, v = make_qkv(b=2, h=2, length=length, d=8, dv=3)
    phi_q, _ = attn.feature_map(q, is_query=True)  # (B, H, L, 2D)
    phi_k, _ = attn.feature_map(k, is_query=False)  # (B, H, L, 2D)
    relu = (torch.relu(q) + attn.kernel_eps) @ (torch.relu(k) + attn.kernel_eps).transpose(-1, -2)  # (B, H, L, L)
    ratio = (phi_q @ phi_k.transpose(-1, -2)) / relu  # the cos weights
    torch.testing.assert_close(ratio[..., -1, 0], torch.full((2, 2), math.cos(math.pi / 2 * (length - 1) / length),
                                                             dtype=torch.float64), rtol=1e-12, atol=1e-14)
    out = attn(q, k, v, causal=causal)
    torch.testing.assert_close(out, build(max_len=length)(q, k, v, causal=causal), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, reference("cosformer", attn, q, k, v, causal=causal), rtol=1e-10, atol=1e-10)
    assert (out - build(max_len=1024)(q, k, v, causal=causal)).abs().max() > 1e-3


def test_decoding_without_max_len_raises_and_with_max_len_l_equals_the_default_forward():
    """Decoding fixes M before the length is known: max_len None raises one clear error (prefill and
    decode_step); with max_len = L, stepping through the sequence gives the default causal forward (M = L)."""
    q, k, v = make_qkv(b=2, h=2, length=13, d=8, dv=3)
    attn = build()
    for call in (lambda: attn.decode_step(q[:, :, :1], k[:, :, :1], v[:, :, :1]), lambda: attn.prefill(k, v)):
        with pytest.raises(ValueError, match="decoding needs a fixed M.*set the attention's max_len"):
            call()
    full = attn(q, k, v, causal=True)
    torch.testing.assert_close(decode_sequence(build(max_len=13), q, k, v), full, rtol=1e-12, atol=1e-12)
    state = build(max_len=13).prefill(k[:, :, :5], v[:, :, :5])
    rows = []
    for t in range(5, 13):
        out, state = build(max_len=13).decode_step(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], state)
        rows.append(out)
    torch.testing.assert_close(torch.cat(rows, dim=2), full[:, :, 5:], rtol=1e-12, atol=1e-12)
