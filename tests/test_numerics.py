"""Low precision and large logits: bf16/fp16 outputs against the float64 answer on the same
(rounded) inputs and weights, fp32 feature maps under autocast."""

import copy

import pytest
import torch

import efficient_attn as ea

from .helpers import skip_unsupported
from .test_reference import UNNORMALISED, reference

ALL = ea.list_attentions()
# Trigonometric features are unbounded (h(k) = exp(‖k‖²/2)) and can cancel to a zero normalizer:
# their breakdown at large norms is the Performer paper's finding, measured in the analysis tools.
BOUNDED = [(n, {}) for n in ALL] + [("favor", {"kernel": "relu"})]


def large_qkv(dtype, b=2, h=2, length=96, d=64, scale=4.0):
    """‖q‖, ‖k‖ at 4× a unit Gaussian's at d=64 (logits qᵀk/√d with std 16)."""
    q, k = (torch.randn(b, h, length, d) * scale for _ in range(2))
    return q.to(dtype), k.to(dtype), torch.randn(b, h, length, d).to(dtype)


# (mean, max) of |out − float64 answer| / max|v|; measured at about a third of these (seeded).
# Unnormalised variants (retention) divide by max|answer| instead: their rows are not averages of v
# (here max|out| ≈ 90·max|v|), and rounding the output alone errs by up to |out|·2^-8 in bf16.
# Unit-scale logits (dot, bilinear: scale 1) make softmax nearly one-hot at these norms, so one
# rounding can move a whole row to another key: their max bound is looser, their mean is not.
TOLERANCE = {torch.bfloat16: (1.5e-3, 0.01), torch.float16: (2e-4, 1.5e-3)}
ONE_HOT = {"dot": 0.1, "bilinear": 0.3}


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name, kwargs", BOUNDED)
def test_low_precision_large_logits_match_float64(name, kwargs, dtype, causal):
    """bf16/fp16 at 4× norms == float64 on the same rounded inputs and weights, to the dtype's precision."""
    torch.manual_seed(1)
    attn = ea.create_attention(name, head_dim=64, num_heads=2, **kwargs).to(dtype).eval()
    q, k, v = large_qkv(dtype)
    mask = torch.zeros(2, 96, dtype=torch.bool)
    mask[1, 80:] = True
    skip_unsupported(name, lambda: attn(q, k, v, key_padding_mask=mask, causal=causal), causal=causal)
    out = attn(q, k, v, key_padding_mask=mask, causal=causal)
    assert out.dtype == dtype and out.isfinite().all()
    exact = copy.deepcopy(attn).double()  # the same rounded weights, upcast exactly
    want = reference(name, exact, q.double(), k.double(), v.double(), mask, causal)
    err = (out.double() - want).abs() / (want if name in UNNORMALISED else v).abs().max().double()
    mean_tol, max_tol = TOLERANCE[dtype]
    max_tol = max(max_tol, ONE_HOT.get(name, 0.0) * (1 if dtype == torch.bfloat16 else 0.1))
    assert err.mean() < mean_tol and err.max() < max_tol, (err.mean().item(), err.max().item())


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
    want = copy.deepcopy(mha).double()(x.double(), causal=True)  # the float64 answer, same weights
    err = (out.double() - want).abs()
    assert err.mean() < 0.03 * want.abs().mean(), (err.mean().item(), want.abs().mean().item())


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


@pytest.mark.parametrize("d, scale", [(64, 4.0), (128, 2.0)])
@pytest.mark.parametrize("causal", [False, True])
def test_favor_fp32_large_norms_match_its_float64_formula(d, scale, causal):
    """fp32 FAVOR+ at large norms == the plain float64 formula with the same features, to ~1e-4."""
    favor = ea.create_attention("favor", head_dim=d, num_heads=2, num_features=256, seed=0)
    q, k, v = large_qkv(torch.float32, d=d, scale=scale)
    out = favor(q, k, v, causal=causal)
    want = reference("favor", favor, q.double(), k.double(), v.double(), None, causal=causal)
    err = (out.double() - want).abs() / v.abs().max()
    assert out.isfinite().all() and err.max() < 1e-3 and err.mean() < 1e-4, (err.max().item(), err.mean().item())
