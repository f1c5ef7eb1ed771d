"""Low precision and large logits: finite outputs, fp32 feature maps under autocast."""

import pytest
import torch

import efficient_attn as ea

ALL = ea.list_attentions()
# Trigonometric features are unbounded (h(k) = exp(‖k‖²/2)) and can cancel to a zero normalizer:
# their breakdown at large norms is the Performer paper's finding, measured in the analysis tools.
BOUNDED = [(n, {}) for n in ALL] + [("favor", {"kernel": "relu"})]


def large_qkv(dtype, b=2, h=2, length=96, d=64, scale=4.0):
    """‖q‖, ‖k‖ at 4× a unit Gaussian's at d=64 (logits qᵀk/√d with std 16)."""
    q, k = (torch.randn(b, h, length, d) * scale for _ in range(2))
    return q.to(dtype), k.to(dtype), torch.randn(b, h, length, d).to(dtype)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name, kwargs", BOUNDED)
def test_low_precision_large_logits_finite(name, kwargs, dtype, causal):
    attn = ea.create_attention(name, head_dim=64, num_heads=2, **kwargs).to(dtype)
    q, k, v = large_qkv(dtype)
    mask = torch.zeros(2, 96, dtype=torch.bool)
    mask[1, 80:] = True
    out = attn(q, k, v, key_padding_mask=mask, causal=causal)
    assert out.dtype == dtype and out.isfinite().all()


@pytest.mark.parametrize("name, kwargs", BOUNDED)
def test_bf16_autocast_through_wrapper(name, kwargs):
    mha = ea.MultiHeadAttention(128, 2, attention=name, attention_kwargs=kwargs)
    x = torch.randn(2, 64, 128) * 4
    x.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mha(x, causal=True)
    assert out.dtype == torch.bfloat16 and out.isfinite().all()
    out.float().square().mean().backward()
    assert x.grad.isfinite().all()
    ref = mha(x)  # fp32, non-causal: only checks the scale of the answer
    assert out.float().abs().max() < 10 * ref.abs().max() + 1


@pytest.mark.parametrize("kernel", ["softmax", "relu", "softmax_trig"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_favor_features_in_fp32(kernel, dtype):
    """Low-precision inputs give the fp32 answer on those same inputs, rounded once at the end."""
    attn = ea.create_attention("favor", head_dim=64, num_heads=2, kernel=kernel)
    q, k, v = large_qkv(dtype, scale=1.0)
    got = attn(q, k, v, causal=True)
    want = attn(q.float(), k.float(), v.float(), causal=True)
    torch.testing.assert_close(got.float(), want.to(dtype).float(), rtol=0, atol=0)
    with torch.autocast("cpu", dtype=dtype):
        auto = attn(q, k, v, causal=True)
    torch.testing.assert_close(auto.float(), want.to(dtype).float(), rtol=0, atol=0)


def test_favor_fp32_large_norms_close_to_exact():
    """At 4× scale FAVOR+ stays finite and its output error stays bounded by the values' range."""
    favor = ea.create_attention("favor", head_dim=64, num_heads=2, num_features=256)
    exact = ea.create_attention("softmax", head_dim=64, num_heads=2)
    q, k, v = large_qkv(torch.float32, scale=4.0)
    out = favor(q, k, v, causal=True)
    assert out.isfinite().all()
    assert (out - exact(q, k, v, causal=True)).abs().max() <= 2 * v.abs().max()
    q, k, v = large_qkv(torch.float32, d=128, scale=2.0)
    favor128 = ea.create_attention("favor", head_dim=128, num_heads=2)
    assert favor128(q, k, v).isfinite().all()
