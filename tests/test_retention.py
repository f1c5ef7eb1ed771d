"""Retention (RetNet): the formula in float64; parallel == chunked == recurrent (outputs and state);
causal-only and self-attention-only refusals; causality to the bit; padding (inf/NaN); gradients
across chunk boundaries; bf16 at large norms."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torch import Tensor
from torch.autograd import gradcheck, gradgradcheck

import efficient_attn as ea
from efficient_attn.attention.retention import chunked_retention, parallel_retention
from efficient_attn.transformer import (
    AttentionSpec,
    Seq2SeqTransformer,
    TransformerClassifier,
    TransformerConfig,
    TransformerLM,
)

from .helpers import (
    assert_causal_rows_ignore_the_future,
    assert_poisoned_padding_changes_nothing,
    decode_sequence,
    make_qkv,
)


def build(d: int = 8, h: int = 2, dtype: torch.dtype = torch.float64, **kwargs) -> torch.nn.Module:
    return ea.create_attention("retention", head_dim=d, num_heads=h, **kwargs).to(dtype)


def plain(q: Tensor, k: Tensor, v: Tensor, gammas, scale: float, mask: Tensor | None = None) -> Tensor:
    """out_t = Σ_{j≤t, j unpadded} γ_h^{t−j} scale (q_t·k_j) v_j, term by term in float64."""
    b, h, length, _ = q.shape
    out = torch.zeros(b, h, length, v.shape[-1], dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            for t in range(length):
                for j in range(t + 1):
                    if mask is None or not mask[bi, j]:
                        weight = gammas[hi] ** (t - j) * scale * (q[bi, hi, t] @ k[bi, hi, j])
                        out[bi, hi, t] += weight * v[bi, hi, j]
    return out


def test_default_decays_are_retnets():
    attn = build(h=4)
    assert attn.gammas == (1 - 2**-5, 1 - 2**-6, 1 - 2**-7, 1 - 2**-8)
    assert attn.scale == pytest.approx(8**-0.5, rel=1e-15)


@pytest.mark.parametrize("options", [{}, {"gammas": [0.5, 1.0]}, {"gammas": 0.9, "scale": 1.0}],
                         ids=["retnet", "per-head", "one-gamma"])
@pytest.mark.parametrize("length, chunk", [(13, 4), (12, 4), (13, 1), (13, 64), (9, 5)])
def test_matches_the_formula(length, chunk, options):
    attn = build(chunk_size=chunk, **options)
    q, k, v = make_qkv(b=2, h=2, length=length, d=8, dv=5)
    mask = torch.zeros(2, length, dtype=torch.bool)
    mask[0, -3:] = True
    mask[1, :2] = True  # left padding: rows 0-1 see no key
    for m in (None, mask):
        want = plain(q, k, v, attn.gammas, attn.scale, m)
        torch.testing.assert_close(attn(q, k, v, key_padding_mask=m, causal=True), want, rtol=1e-12, atol=1e-12)
    assert (attn(q, k, v, key_padding_mask=mask, causal=True)[1, :, :2] == 0).all()


@pytest.mark.parametrize("gammas", [None, [0.3, 1.0]])
@pytest.mark.parametrize("length", [1, 7, 16, 37])
def test_parallel_chunked_and_recurrent_forms_agree(length, gammas):
    """Outputs of all three, for chunk sizes that do and do not divide L; and the recurrent final
    state S_L = Σ_j γ^{L−1−j} k_jᵀ v_j (unscaled)."""
    attn = build(gammas=gammas)
    q, k, v = make_qkv(b=2, h=2, length=length, d=8, dv=5)
    log_gamma = attn.log_gammas(torch.float64, q.device)
    parallel = parallel_retention(q * attn.scale, k, v, log_gamma)
    for chunk in (1, 3, 8, 16, 64):
        chunked = chunked_retention(q * attn.scale, k, v, log_gamma, chunk)
        torch.testing.assert_close(chunked, parallel, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(decode_sequence(attn, q, k, v), parallel, rtol=1e-12, atol=1e-12)
    state = None
    for t in range(length):
        _, state = attn.decode_step(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], state)
        assert state["kv"].shape == (2, 2, 8, 5)  # (B, H, D, Dv) whatever t
    decay = torch.tensor(attn.gammas, dtype=torch.float64)[:, None] ** torch.arange(length - 1, -1, -1)  # (H, L)
    want = (k * decay[None, :, :, None]).transpose(-1, -2) @ v  # (B, H, D, Dv)
    torch.testing.assert_close(state["kv"], want, rtol=1e-12, atol=1e-12)


def test_non_causal_and_cross_attention_are_refused_clearly():
    attn = build()
    q, k, v = make_qkv(b=1, h=2, length=6, d=8)
    with pytest.raises(ValueError, match="causal-only: it needs causal=True"):
        attn(q, k, v)
    with pytest.raises(ValueError, match="causal-only"):
        attn(q, k, v, key_padding_mask=torch.zeros(1, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="self-attention only.*S == L|needs self-attention"):
        attn(q, k[:, :, :4], v[:, :, :4], causal=True)  # causal cross-attention: refused by check_inputs
    with pytest.raises(ValueError, match="causal-only"):
        attn(q, k[:, :, :4], v[:, :, :4])
    with pytest.raises(ValueError, match="causal-only"):
        attn.cache_memory(k, v)


def test_models_accept_it_only_as_decoder_self_attention():
    cfg = TransformerConfig(d_model=16, num_heads=2, d_ff=32, encoder_layers=1, decoder_layers=1, max_len=32)
    spec, softmax = AttentionSpec("retention"), AttentionSpec("softmax")
    with pytest.raises(ValueError, match="encoder attention: attention 'retention' cannot serve as encoder"):
        TransformerClassifier(cfg, 20, 3, attention=spec)
    with pytest.raises(ValueError, match="encoder attention: .*causal-only"):
        Seq2SeqTransformer(cfg, 20, encoder_attention=spec, decoder_attention=spec, cross_attention=softmax)
    with pytest.raises(ValueError, match="cross attention: .*causal-only"):
        Seq2SeqTransformer(cfg, 20, encoder_attention=softmax, decoder_attention=spec, cross_attention=spec)
    Seq2SeqTransformer(cfg, 20, encoder_attention=softmax, decoder_attention=spec, cross_attention=softmax)
    lm = TransformerLM(cfg, 20, attention=spec)
    assert lm(torch.randint(20, (2, 9))).isfinite().all()


@pytest.mark.parametrize("chunk", [3, 4, 64])
def test_causal_future_changes_leave_the_past_bit_identical(chunk):
    attn = build(chunk_size=chunk)
    q, k, v = make_qkv(b=2, h=2, length=23, d=8)
    assert_causal_rows_ignore_the_future(attn, q, k, v, (0, 2, 3, 7, 15, 21))  # inside chunks and at their edges


def test_inf_and_nan_in_padded_keys_change_nothing():
    """Padded keys add nothing: outputs and gradients bit-equal to zeros there, none reach padding."""
    attn = build(chunk_size=4)
    q, k, v = make_qkv(b=2, h=2, length=14, d=8)
    mask = torch.zeros(2, 14, dtype=torch.bool)
    mask[0, 10:] = True
    mask[1, :3] = True
    mask[1, 7] = True

    out = assert_poisoned_padding_changes_nothing(attn, q, k, v, mask, causal=True)
    assert (out[1, :, :3] == 0).all()  # rows before the first real key


@pytest.mark.parametrize("gammas", [None, [0.5, 0.9]])
@pytest.mark.parametrize("length, chunk", [(11, 3), (12, 4), *(pytest.param(*c, marks=pytest.mark.slow)
                                                       for c in ((11, 4), (7, 7)))])
def test_first_and_second_derivatives_across_chunks(length, chunk, gammas):
    attn = build(d=3, chunk_size=chunk, gammas=gammas)
    q, k, v = (t.requires_grad_() for t in make_qkv(b=1, h=2, length=length, d=3, dv=2))
    mask = torch.zeros(1, length, dtype=torch.bool)
    mask[0, chunk - 1 : chunk + 1] = True  # padding across a chunk edge
    fn = lambda a, b, c: attn(a, b, c, key_padding_mask=mask, causal=True)
    assert gradcheck(fn, (q, k, v))
    assert gradgradcheck(fn, (q, k, v))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_large_norms_match_float64(dtype):
    """Computed in float32 and rounded once: each output is within the dtype's unit roundoff of itself
    (u·|want|, u = 2^-8 bf16, 2^-11 fp16) of the float64 answer on the same rounded inputs, plus float32's own
    rounding of sums whose terms reach ~100·max|v| here (allowed: 1e-5·max|want|). Outputs are
    unnormalised (max|out| ≈ 90·max|v| at these norms), so the error is measured against |want|."""
    attn = build(d=64, dtype=dtype, chunk_size=16)
    q, k, v = (torch.randn(2, 2, 96, 64) * s for s in (4.0, 4.0, 1.0))  # q·k/√d of std 16
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    mask = torch.zeros(2, 96, dtype=torch.bool)
    mask[1, 80:] = True
    out = attn(q, k, v, key_padding_mask=mask, causal=True)
    assert out.dtype == dtype and out.isfinite().all()
    want = parallel_retention(q.double() * attn.scale, k.double(), v.double().masked_fill(mask[:, None, :, None], 0),
                              attn.log_gammas(torch.float64, q.device))
    unit = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    err = (out.double() - want).abs()
    assert (err <= unit * want.abs() + 1e-5 * want.abs().max()).all(), (err / want.abs().max()).max().item()
    q.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = attn(q, k, v, causal=True)
    auto.float().sum().backward()
    assert q.grad.isfinite().all()


def test_options_from_a_hydra_list_and_bad_values():
    attn = ea.create_attention("retention", head_dim=8, num_heads=2, gammas=OmegaConf.create([0.5, 0.25]))
    assert attn.gammas == (0.5, 0.25)
    for bad in ({"gammas": [0.5]}, {"gammas": [0.5, 0.0]}, {"gammas": 1.5}, {"gammas": "0.9"}, {"gammas": True},
                {"scale": -1.0}, {"chunk_size": 0}):
        with pytest.raises(ValueError):
            ea.create_attention("retention", head_dim=8, num_heads=2, **bad)


def test_casting_the_module_does_not_round_the_decays():
    """γ are Python floats, not a buffer: bf16 cannot round 1 − 2^-12 to 1."""
    attn = build(h=8, dtype=torch.bfloat16)
    assert attn.gammas[7] == 1 - 2**-12 and not list(attn.buffers())


def _saved_bytes(recompute: bool, length: int = 256, d: int = 16) -> tuple[int, int]:
    """(bytes retention keeps for backward, one float32 (B, H, L, D) tensor's bytes)."""
    from efficient_attn_tasks.bench.saved import saved_for_backward

    attn = build(d=d, dtype=torch.float32, chunk_size=32, recompute=recompute).train()
    q, k, v = (torch.randn(2, 2, length, d, requires_grad=True) for _ in range(3))
    rows = saved_for_backward(attn, lambda: attn(q, k, v, causal=True).sum())
    return sum(r.nbytes for r in rows), 2 * 2 * length * d * 4


def test_recompute_keeps_only_q_k_v():
    """With ``recompute`` (the default) backward holds q, k, v and nothing else of (B, H, L, ·) size (no score
    blocks, decayed copies or chunk states); without it, several times that (so the bound is not vacuous)."""
    kept, unit = _saved_bytes(recompute=True)
    assert kept <= 3 * unit + 4096, kept / unit
    assert _saved_bytes(recompute=False)[0] > 5 * unit


@pytest.mark.parametrize("rotary", [False, True])
def test_recompute_matches_keeping_the_graph(rotary):
    """Same output and gradients (float64, padding across a chunk edge) with and without ``recompute``."""
    results = []
    for recompute in (False, True):
        attn = build(d=4, chunk_size=5, rotary=rotary, gammas=[0.5, 0.9], recompute=recompute)
        torch.manual_seed(1)
        q, k, v = (t.requires_grad_() for t in make_qkv(b=2, h=2, length=17, d=4, dv=3))
        mask = torch.zeros(2, 17, dtype=torch.bool)
        mask[1, 4:6] = True
        out = attn(q, k, v, key_padding_mask=mask, causal=True)
        grads = torch.autograd.grad(out, (q, k, v), torch.randn(out.shape, dtype=out.dtype))
        results.append((out, grads))
    (out0, grads0), (out1, grads1) = results
    torch.testing.assert_close(out1, out0, rtol=0, atol=0)
    for g1, g0 in zip(grads1, grads0):
        torch.testing.assert_close(g1, g0, rtol=1e-12, atol=1e-13)
