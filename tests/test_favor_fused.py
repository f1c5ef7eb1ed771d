"""FAVOR+'s fused path (``efficient_attn.ops.favor_fused``) against the generic one.

Positive kernels make their features block by block inside the products and never hold a whole
(L, m) gradient of them; the estimator and its stabilisation are unchanged, so on the same module
and inputs the fused outputs and gradients must be the generic path's (``KernelAttention.attend``,
features materialised) up to float64 rounding: across blocks, across causal chunks (a block holds
several), in both non-causal product orders, with padding anywhere (whole rows included), for
self- and cross-attention. Small ``BLOCK_ELEMENTS`` / ``MIN_BLOCK_ROWS`` make the short sequences
here span many blocks.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import efficient_attn as ea
from efficient_attn.attention.kernel import KernelAttention
from efficient_attn.ops import favor_fused

from .helpers import assert_same_grads, make_qkv


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 8 rows (6 under causal chunks of 3): L = 21 spans 3 (4) blocks, one of them partial."""
    monkeypatch.setattr(favor_fused, "BLOCK_ELEMENTS", 1)
    monkeypatch.setattr(favor_fused, "MIN_BLOCK_ROWS", 8)


def _favor(kernel="softmax", chunk=3, m=16, d=8):
    return ea.create_attention("favor", head_dim=d, num_heads=2, num_features=m, kernel=kernel, seed=3,
                               chunk_size=chunk).double()


def _generic(attn, q, k, v, mask, causal):
    """The unfused path on the same module (``Attention.forward`` zeroes padded k, v first)."""
    if mask is not None:
        pad = mask[:, None, :, None]
        k, v = k.masked_fill(pad, 0.0), v.masked_fill(pad, 0.0)
    return KernelAttention.attend(attn, q, k, v, mask, causal)


def _mask(s, kind):
    if kind == "none":
        return None
    mask = torch.zeros(3, s, dtype=torch.bool)
    mask[0, s - 5 :] = True  # right padding (a whole block of keys at the end, under small blocks)
    mask[1, :7] = True  # left padding: causal rows 0..6 see nothing
    mask[2, :] = True  # every key padded: the rows are 0, not NaN
    return mask


def _check(attn, q, k, v, mask, causal):
    got = lambda: attn(q, k, v, key_padding_mask=mask, causal=causal)
    want = lambda: _generic(attn, q, k, v, mask, causal)
    torch.testing.assert_close(got(), want(), rtol=1e-10, atol=1e-12)
    assert_same_grads(got, want, (q, k, v))


@pytest.mark.parametrize("pad", ["none", "mixed"])
@pytest.mark.parametrize("kernel", ["softmax", "softmax_hyp"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_fused_equals_the_generic_path_across_blocks_and_chunks(small_blocks, causal, kernel, pad):
    attn = _favor(kernel)
    q, k, v = (t.requires_grad_() for t in make_qkv(b=3, h=2, length=21, d=8, scale=1.5))
    _check(attn, q, k, v, _mask(21, pad), causal)


@pytest.mark.parametrize("pad", ["none", "mixed"])
def test_fused_cross_attention_equals_the_generic_path(small_blocks, pad):
    attn = _favor()
    q, k, v = (t.requires_grad_() for t in make_qkv(b=3, h=2, length=21, s=13, d=8, dv=5, scale=1.5))
    _check(attn, q, k, v, _mask(13, pad), False)


@pytest.mark.parametrize("order", ["pairwise", "linear"])
@pytest.mark.parametrize("pad", ["none", "mixed"])
def test_both_noncausal_product_orders_equal_the_generic_path(monkeypatch, order, pad):
    """(φ(q)φ(k)ᵀ)·v and φ(q)·(φ(k)ᵀv) on the same inputs, whichever ``_pairwise_is_cheaper`` picks."""
    monkeypatch.setattr(favor_fused, "_pairwise_is_cheaper", lambda *sizes: order == "pairwise")
    attn = _favor()
    q, k, v = (t.requires_grad_() for t in make_qkv(b=3, h=2, length=12, s=9, d=8, scale=1.5))
    _check(attn, q, k, v, _mask(9, pad), False)


def test_pairwise_order_is_taken_exactly_when_it_costs_fewer_flops():
    """2·L·S·(m+E) against 2·(L+S)·m·E: the quickstart's lengths at m = 256, E = 17 go pairwise,
    long ones do not (and neither does any length once m = E = 1 makes the linear order trivial)."""
    assert favor_fused._pairwise_is_cheaper(13, 13, 256, 17)  # 46 137 < 113 152
    assert not favor_fused._pairwise_is_cheaper(64, 64, 256, 17)  # 1 118 208 > 557 056
    assert favor_fused._pairwise_is_cheaper(1, 1, 256, 65)


def test_float32_at_large_norms_across_blocks_matches_float64(small_blocks):
    """The per-key log-scales still hold when keys far apart in norm land in different blocks and
    chunks: float32 against float64 on the same projection, d = 64, key log-scales down to about
    −250 nats (far beyond float32's e^−87), rising, constant or falling along the sequence, with right
    and left padding (a padded key set as the maximum would underflow every real one)."""
    attn = ea.create_attention("favor", head_dim=64, num_heads=2, num_features=64, seed=1, chunk_size=3).eval()
    q, k, v = make_qkv(b=3, h=2, length=21, d=64)
    norms = torch.stack([torch.linspace(1.0, 6.0, 21), torch.full((21,), 9.0), torch.linspace(6.0, 1.0, 21)])
    k = k * norms.double()[:, None, :, None]  # (B, 1, L, 1)
    mask = torch.zeros(3, 21, dtype=torch.bool)
    mask[0, 16:], mask[1, :7] = True, True
    for causal in (False, True):
        want = attn.double()(q, k, v, key_padding_mask=mask, causal=causal)
        got = attn.float()(q.float(), k.float(), v.float(), key_padding_mask=mask, causal=causal)
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


class _Sizes(TorchDispatchMode):
    """Element counts of every tensor an ATen op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_no_op_returns_a_whole_feature_tensor(small_blocks, causal):
    """Forward and backward never build a (B, H, L, m) tensor (features, their gradient, logits):
    the largest anything gets is one block of rows (or, causally, a state or a score block)."""
    b, h, length, d, m = 1, 2, 64, 4, 64
    attn = _favor(chunk=4, m=m, d=d)
    q, k, v = (t.requires_grad_() for t in make_qkv(b=b, h=h, length=length, d=d))
    with _Sizes() as sizes:
        attn(q, k, v, causal=causal).square().sum().backward()
    assert sizes.largest < b * h * length * m / 4, sizes.largest  # blocks of 8 rows: 1/8 of it
