"""Sliding-window attention: the band formula in float64, causality to the bit, padding (inf/NaN),
gradients across blocks, bf16 at large norms, O(L·w) memory, a decoding cache bounded by the window."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor
from torch.autograd import gradcheck, gradgradcheck
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import efficient_attn as ea
from efficient_attn.transformer import AttentionSpec, Seq2SeqTransformer, TransformerClassifier, TransformerConfig

from .helpers import (
    assert_causal_rows_ignore_the_future,
    assert_poisoned_padding_changes_nothing,
    decode_sequence,
    make_qkv,
)


def build(window: int, d: int = 8, h: int = 2, dtype: torch.dtype = torch.float64, **kwargs) -> torch.nn.Module:
    return ea.create_attention("sliding_window", head_dim=d, num_heads=h, window=window, **kwargs).to(dtype)


def plain(q: Tensor, k: Tensor, v: Tensor, window: int, causal: bool, mask: Tensor | None = None,
          scale: float | None = None) -> Tensor:
    """The formula row by row in float64: softmax over {j : |i − j| < w} (causal: i − w < j ≤ i), unpadded."""
    b, h, length, d = q.shape
    scale = d**-0.5 if scale is None else scale
    out = torch.zeros(b, h, length, v.shape[-1], dtype=torch.float64)
    for i in range(length):
        keys = [j for j in range(length) if (i - window < j <= i if causal else abs(i - j) < window)]
        for bi in range(b):
            seen = [j for j in keys if mask is None or not mask[bi, j]]
            if seen:
                weights = (q[bi, :, i : i + 1] @ k[bi, :, seen].transpose(-1, -2) * scale).softmax(-1)  # (H, 1, n)
                out[bi, :, i] = (weights @ v[bi, :, seen])[:, 0]
    return out


# (L, window): L a multiple of w, not one, w = 1, w ≥ L, one block, blocks of 32 queries shorter than w
CASES = [(12, 4), (13, 4), (13, 5), (17, 3), (9, 1), (6, 6), (6, 64), (1, 3), (100, 40)]


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("length, window", CASES)
def test_matches_the_band_formula(length, window, causal):
    attn = build(window)
    q, k, v = make_qkv(b=2, h=2, length=length, d=8, dv=5)
    mask = torch.zeros(2, length, dtype=torch.bool)
    mask[0, -2:] = True  # right padding
    mask[1, : min(3, length)] = True  # left padding: under causal, its rows 0-2 see nothing
    for m in (None, mask):
        got = attn(q, k, v, key_padding_mask=m, causal=causal)
        torch.testing.assert_close(got, plain(q, k, v, window, causal, m), rtol=1e-12, atol=1e-13)


def test_scale_option():
    q, k, v = make_qkv(b=1, h=2, length=10, d=8)
    got = build(3, scale=0.2)(q, k, v)
    torch.testing.assert_close(got, plain(q, k, v, 3, False, scale=0.2), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("causal", [False, True])
def test_a_window_past_the_sequence_is_softmax_attention(causal):
    q, k, v = make_qkv(b=2, h=2, length=11, d=8)
    mask = torch.zeros(2, 11, dtype=torch.bool)
    mask[1, 7:] = True
    softmax = ea.create_attention("softmax", head_dim=8, num_heads=2)
    for window in (11, 12, 100):
        got = build(window)(q, k, v, key_padding_mask=mask, causal=causal)
        torch.testing.assert_close(got, softmax(q, k, v, key_padding_mask=mask, causal=causal), rtol=1e-12, atol=1e-13)


def test_window_one_returns_each_value():
    q, k, v = make_qkv(b=2, h=2, length=9, d=8)
    for causal in (False, True):
        assert torch.equal(build(1)(q, k, v, causal=causal), v)


@pytest.mark.parametrize("causal", [False, True])
def test_each_query_sees_exactly_its_band(causal):
    """The gradient of row i reaches key j exactly when j is in the band (an off-by-one fails here)."""
    length, window = 13, 4
    q, k, v = make_qkv(b=1, h=1, length=length, d=8)
    attn = build(window, h=1)
    k.requires_grad_()
    for i in range(length):
        (grad,) = torch.autograd.grad(attn(q, k, v, causal=causal)[0, 0, i].sum(), k)
        reached = {j for j in range(length) if grad[0, 0, j].abs().sum() > 0}
        band = {j for j in range(length) if (i - window < j <= i if causal else abs(i - j) < window)}
        assert reached == band - ({i} if len(band) == 1 else set()), (i, sorted(reached))


def test_rows_whose_band_is_all_padding_are_zero_without_nan():
    """w = 2, keys 3-5 padded: causal rows 4, 5 (keys 3-4, 4-5) and bidirectional row 4 (keys 3-5)
    see only padding, though other keys are visible to the sequence."""
    attn = build(2)
    q, k, v = (t.requires_grad_() for t in make_qkv(b=1, h=2, length=9, d=8))
    mask = torch.zeros(1, 9, dtype=torch.bool)
    mask[0, 3:6] = True
    for causal, empty in ((True, [4, 5]), (False, [4])):
        out = attn(q, k, v, key_padding_mask=mask, causal=causal)
        assert out.isfinite().all()
        for i in range(9):
            assert (out[0, :, i] == 0).all() == (i in empty), (causal, i)
        out.square().sum().backward()
        assert all(t.grad.isfinite().all() for t in (q, k, v))
        assert (k.grad[0, :, 3:6] == 0).all() and (v.grad[0, :, 3:6] == 0).all()
        q.grad = k.grad = v.grad = None


@pytest.mark.parametrize("window", [3, 4, 16])
def test_causal_future_changes_leave_the_past_bit_identical(window):
    attn = build(window)
    q, k, v = make_qkv(b=2, h=2, length=23, d=8)
    assert_causal_rows_ignore_the_future(attn, q, k, v, (0, 2, 3, 7, 15, 21))  # inside blocks and at their edges


@pytest.mark.parametrize("causal", [False, True])
def test_inf_and_nan_in_padded_keys_change_nothing(causal):
    """Same outputs and gradients, bit for bit, as with zeros there; and no gradient reaches padding."""
    attn = build(4)
    q, k, v = make_qkv(b=2, h=2, length=14, d=8)
    mask = torch.zeros(2, 14, dtype=torch.bool)
    mask[0, 10:] = True
    mask[1, :3] = True
    mask[1, 7] = True

    assert_poisoned_padding_changes_nothing(attn, q, k, v, mask, causal=causal)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("length, window", [(11, 3), (12, 4), *(pytest.param(*c, marks=pytest.mark.slow)
                                                        for c in ((11, 4), (7, 2)))])
def test_first_and_second_derivatives_across_blocks(length, window, causal):
    attn = build(window, d=3, h=2)
    q, k, v = (t.requires_grad_() for t in make_qkv(b=1, h=2, length=length, d=3, dv=2))
    mask = torch.zeros(1, length, dtype=torch.bool)
    mask[0, window : window + 2] = True  # padding across a block edge
    fn = lambda a, b, c: attn(a, b, c, key_padding_mask=mask, causal=causal)
    assert gradcheck(fn, (q, k, v))
    assert gradgradcheck(fn, (q, k, v))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_large_norms_match_float64(dtype, causal):
    """Scores and softmax run in float32 and the output is rounded once, so each output is within the
    dtype's unit roundoff u = 2^-8 (bf16), 2^-11 (fp16) of itself from the float64 answer on the same
    rounded inputs; a convex combination of values is at most max|v|, so |err| ≤ u·max|v| (+1%)."""
    attn = build(16, d=64, dtype=dtype)
    q, k, v = (torch.randn(2, 2, 96, 64) * s for s in (4.0, 4.0, 1.0))  # logits q·k/√d of std 16
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    mask = torch.zeros(2, 96, dtype=torch.bool)
    mask[1, 80:] = True
    out = attn(q, k, v, key_padding_mask=mask, causal=causal)
    assert out.dtype == dtype and out.isfinite().all()
    want = plain(q.double(), k.double(), v.double(), 16, causal, mask)
    unit = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    err = (out.double() - want).abs().max() / v.abs().max().double()
    assert err <= unit * 1.01, err.item()


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        sizes = [t.numel() for t in tree_flatten(out)[0] if isinstance(t, Tensor)]
        self.numel = max([self.numel, *sizes])
        return out


def largest_tensor(length: int, window: int, causal: bool) -> int:
    attn = build(window, d=8, h=1, dtype=torch.float32)
    q, k, v = (t.requires_grad_() for t in make_qkv(b=1, h=1, length=length, d=8, dtype=torch.float32))
    mask = torch.zeros(1, length, dtype=torch.bool)
    mask[0, -5:] = True
    with LargestTensor() as probe:
        attn(q, k, v, key_padding_mask=mask, causal=causal).square().sum().backward()
    return probe.numel


@pytest.mark.parametrize("causal", [False, True])
def test_memory_is_linear_in_length_no_length_squared_tensor(causal):
    """Every tensor made in forward and backward is O(L·w): far below L², and it doubles with L."""
    window = 16
    small, large = largest_tensor(1024, window, causal), largest_tensor(2048, window, causal)
    assert large <= 3 * 2048 * window * 8 and large < 2048**2 / 16, large  # ≤ L·3w·D elements
    assert large <= 2.05 * small, (small, large)


def test_decoding_cache_is_bounded_by_the_window_and_equals_the_causal_forward():
    attn = build(4)
    q, k, v = make_qkv(b=2, h=2, length=15, d=8, dv=5)
    state, sizes = None, []
    for t in range(15):
        _, state = attn.decode_step(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], state)
        sizes.append(state["k"].shape[2])
        assert state["v"].shape == (2, 2, sizes[-1], 5)
        torch.testing.assert_close(state["k"], k[:, :, max(0, t - 3) : t + 1], rtol=0, atol=0)
    assert sizes == [1, 2, 3, 4] + [4] * 11  # grows to the window, then stays
    torch.testing.assert_close(decode_sequence(attn, q, k, v), attn(q, k, v, causal=True), rtol=1e-12, atol=1e-13)


def test_cross_attention_is_refused_clearly():
    attn = build(4)
    q, k, v = make_qkv(b=1, h=2, length=5, s=9, d=8)
    with pytest.raises(ValueError, match="self-attention only.*S == L"):
        attn(q, k, v)
    with pytest.raises(ValueError, match="self-attention only"):
        attn.cache_memory(k, v)
    cfg = TransformerConfig(d_model=16, num_heads=2, d_ff=32, encoder_layers=1, decoder_layers=1, max_len=32)
    spec, softmax = AttentionSpec("sliding_window", {"window": 4}), AttentionSpec("softmax")
    with pytest.raises(ValueError, match="cross attention: attention 'sliding_window' cannot serve as cross"):
        Seq2SeqTransformer(cfg, 20, encoder_attention=spec, decoder_attention=spec, cross_attention=spec)
    Seq2SeqTransformer(cfg, 20, encoder_attention=spec, decoder_attention=spec, cross_attention=softmax)
    TransformerClassifier(cfg, 20, 3, attention=spec)


@pytest.mark.parametrize("bad", [{"window": 0}, {"window": 2.5}, {"window": True}, {"scale": 0.0}])
def test_bad_options_raise(bad):
    with pytest.raises(ValueError):
        ea.create_attention("sliding_window", head_dim=8, num_heads=2, **bad)


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_number_of_keys_a_query_sees(causal):
    """w = 5, L = 20: an inner query sees w keys causal (i − 4..i) and 2w − 1 = 9 bidirectional (|i − j| < 5),
    not Longformer's w/2 per side; row 0 sees 1 (causal) or w (bidirectional); decoding keeps w keys."""
    length, window = 20, 5
    q, k, v = make_qkv(b=1, h=1, length=length, d=8)
    attn = build(window, h=1)
    v.requires_grad_()

    def seen(i: int) -> list[int]:
        (grad,) = torch.autograd.grad(attn(q, k, v, causal=causal)[0, 0, i].sum(), v)  # weight_ij on key j
        return [j for j in range(length) if grad[0, 0, j].abs().sum() > 0]

    assert seen(10) == (list(range(6, 11)) if causal else list(range(6, 15)))
    assert len(seen(10)) == (window if causal else 2 * window - 1)
    assert len(seen(0)) == (1 if causal else window)
    if causal:
        state = attn.prefill(k[:, :, :12], v[:, :, :12].detach())
        assert state["k"].shape[2] == window


def test_band_masks_made_under_inference_mode_do_not_reach_autograd():
    """The band mask is kept per shape; one made under ``torch.inference_mode`` (an inference tensor, which
    autograd cannot save) never reaches a forward that records gradients, and the results agree."""
    attn = build(7, dtype=torch.float32)
    q, k, v = make_qkv(b=1, h=2, length=29, d=8, dtype=torch.float32)  # a shape no other test uses
    with torch.inference_mode():
        want = attn(q, k, v, causal=True)
    q.requires_grad_()
    got = attn(q, k, v, causal=True)
    got.square().sum().backward()
    torch.testing.assert_close(got.detach(), want)
    assert q.grad.isfinite().all()
    with torch.no_grad():  # the kept mask, outside inference mode
        torch.testing.assert_close(attn(q, k, v, causal=True), want)


def test_the_band_mask_cache_stays_bounded():
    """One band mask is kept per shape, at most ``_MASKS_KEPT``: a run over many lengths (bucketed batches,
    a growing prefix) must not keep every mask it ever made."""
    from efficient_attn.attention import sliding_window

    attn = build(3, dtype=torch.float32)
    with torch.no_grad():
        for length in range(5, 5 + 3 * sliding_window._MASKS_KEPT):
            attn(*make_qkv(b=1, h=2, length=length, d=8, dtype=torch.float32))
            assert len(sliding_window._MASKS) <= sliding_window._MASKS_KEPT
