"""Every registered attention equals its float64 reference to ~1e-10, through the public API.

Lengths cross chunk boundaries (chunk sizes that do and do not divide L), with left, right and
total padding, causal and not, self- and cross-attention, step-by-step decoding and cached memory.
FAVOR+ is exact against the plain formula of its own random features, and as an estimator of
softmax attention its error shrinks as the number of features m grows.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

import efficient_attn as ea
from efficient_attn.attention.base import unsupported_use

from .helpers import make_qkv, skip_unsupported
from .test_reference import WITH_REFERENCE, reference

ALL = ea.list_attentions()
# (name, options): every registered variant with its defaults, plus options that change the arithmetic
CONFIGS = [(n, {}) for n in ALL] + [
    ("softmax", {"scale": 0.3}),
    ("bilinear", {"scale": 0.5}),
    ("additive", {"hidden_dim": 5}),
    ("favor", {"kernel": "softmax_trig", "num_features": 32}),
    ("favor", {"kernel": "relu", "num_features": 32, "kernel_eps": 0.05}),
    ("favor", {"orthogonal": False, "num_features": 40}),
    ("sliding_window", {"window": 1}),
    ("sliding_window", {"window": 4}),  # 13 = 3·4 + 1, 130 = 32·4 + 2: a partial last block
    ("sliding_window", {"window": 5}),
    ("retention", {"gammas": [0.5, 1.0]}),  # a fast decay, and none
]
# (L, chunk): 13 = 3·4 + 1 = 2·5 + 3; 64 = 12·5 + 4 = 1·64; 130 = 2·64 + 2 = 26·5
LENGTH_CHUNKS = [(13, 4), (13, 5), (64, 5), (64, 64), (130, 64), (130, 5)]
RTOL, ATOL = 1e-10, 1e-11


def _self_cases() -> list[tuple[tuple[str, dict], int, int]]:
    """(config, L, chunk) for every config; variants without chunking get each length once."""
    cases = []
    for config in CONFIGS:
        chunked = "chunk_size" in ea.attention_options(config[0])
        lengths = LENGTH_CHUNKS if chunked else sorted({(n, 0) for n, _ in LENGTH_CHUNKS})
        cases += [(config, n, c) for n, c in lengths]
    return cases


def build(name: str, d: int = 8, h: int = 2, chunk: int | None = None, **kwargs) -> torch.nn.Module:
    """A float64 attention in eval mode, seeded; ``chunk`` sets chunk_size where the variant has one."""
    if chunk is not None and "chunk_size" in ea.attention_options(name):
        kwargs["chunk_size"] = chunk
    torch.manual_seed(1)
    return ea.create_attention(name, head_dim=d, num_heads=h, **kwargs).double().eval()


def padding(batch: int, length: int, kind: str) -> Tensor | None:
    """(B, S) masks: none, right, left, or mixed (row 0 right-padded, row 1 left-padded)."""
    if kind == "none":
        return None
    mask = torch.zeros(batch, length, dtype=torch.bool)
    if kind in ("right", "mixed"):
        mask[0, length - 3 :] = True
    if kind in ("left", "mixed"):
        mask[-1, :2] = True  # under causal, rows 0-1 of the last batch row see nothing
    return mask


def config_id(config: tuple[str, dict]) -> str:
    name, kwargs = config
    return name + "".join(f"-{k}={v}" for k, v in kwargs.items())


def test_every_registered_attention_has_a_reference():
    missing = sorted(set(ALL) - WITH_REFERENCE)
    assert not missing, f"registered without a float64 reference (add one to tests/test_reference.py): {missing}"


@pytest.mark.parametrize("pad", ["none", "right", "left", "mixed"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "config, length, chunk", _self_cases(), ids=lambda x: config_id(x) if isinstance(x, tuple) else str(x)
)
def test_self_attention_exact(config, length, chunk, causal, pad):
    name, kwargs = config
    attn = build(name, chunk=chunk or None, **kwargs)
    q, k, v = make_qkv(b=2, h=2, length=length, d=8, dv=5, scale=0.7)
    mask = padding(2, length, pad)
    skip_unsupported(name, lambda: attn(q, k, v, key_padding_mask=mask, causal=causal), causal=causal)
    got = attn(q, k, v, key_padding_mask=mask, causal=causal)
    want = reference(name, attn, q, k, v, mask, causal)
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("s", [9, 70])
@pytest.mark.parametrize("pad", ["none", "mixed"])
@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_cross_attention_exact(config, pad, s):
    name, kwargs = config
    attn = build(name, chunk=4, **kwargs)
    q, k, v = make_qkv(b=2, h=2, length=7, s=s, d=8, dv=3, scale=0.7)
    mask = padding(2, s, pad)
    skip_unsupported(name, lambda: attn(q, k, v, key_padding_mask=mask), cross=True)
    got = attn(q, k, v, key_padding_mask=mask)
    torch.testing.assert_close(got, reference(name, attn, q, k, v, mask), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", ALL)
def test_fully_padded_rows_are_zero_and_others_exact(name, causal):
    attn = build(name, chunk=3)
    q, k, v = make_qkv(b=3, h=2, length=10, d=8, dv=4)
    mask = torch.zeros(3, 10, dtype=torch.bool)
    mask[0] = True
    mask[2, :4] = True
    skip_unsupported(name, lambda: attn(q, k, v, key_padding_mask=mask, causal=causal), causal=causal)
    got = attn(q, k, v, key_padding_mask=mask, causal=causal)
    assert (got[0] == 0).all()
    torch.testing.assert_close(got, reference(name, attn, q, k, v, mask, causal), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_decode_steps_equal_reference(config):
    """decode_step through a whole sequence == the float64 causal reference, row by row."""
    name, kwargs = config
    if name == "cosformer":  # decoding fixes M before the length is known: M = L, the forward's default
        kwargs = {"max_len": 11} | kwargs
    attn = build(name, chunk=4, **kwargs)
    q, k, v = make_qkv(b=2, h=2, length=11, d=8, dv=5, scale=0.7)
    state, rows = None, []
    for t in range(11):
        out, state = attn.decode_step(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], state)
        rows.append(out)
    want = reference(name, attn, q, k, v, None, causal=True)
    torch.testing.assert_close(torch.cat(rows, dim=2), want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("pad", ["none", "right", "left", "mixed"])
@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_cached_memory_equals_reference(config, pad):
    """cache_memory + attend_memory == the float64 cross-attention reference."""
    name, kwargs = config
    attn = build(name, **kwargs)
    q, k, v = make_qkv(b=2, h=2, length=4, s=9, d=8, dv=3, scale=0.7)
    mask = padding(2, 9, pad)
    skip_unsupported(name, lambda: attn.cache_memory(k, v, mask), cross=True)
    got = attn.attend_memory(q, attn.cache_memory(k, v, mask))
    torch.testing.assert_close(got, reference(name, attn, q, k, v, mask), rtol=RTOL, atol=ATOL)


def test_cached_memory_of_all_padding_gives_zeros():
    for name in ALL:
        attn = build(name)
        q, k, v = make_qkv(b=1, h=2, length=3, s=5, d=8)
        if unsupported_use(type(attn), causal=False, cross=True):  # no cross-attention: refused at caching
            with pytest.raises(ValueError, match="causal-only|self-attention only"):
                attn.cache_memory(k, v)
            continue
        got = attn.attend_memory(q, attn.cache_memory(k, v, torch.ones(1, 5, dtype=torch.bool)))
        assert got.isfinite().all() and (got == 0).all(), name


def _favor_error(m: int, seeds: range, d: int = 16, length: int = 64) -> float:
    """Mean |FAVOR+ − softmax| over outputs and feature draws, float64, moderate norms."""
    exact = ea.create_attention("softmax", head_dim=d, num_heads=1)
    torch.manual_seed(0)
    q, k, v = make_qkv(b=1, h=1, length=length, d=d, scale=0.5)
    want = exact(q, k, v)
    errors = []
    for seed in seeds:
        favor = ea.create_attention("favor", head_dim=d, num_heads=1, num_features=m, seed=seed).double()
        errors.append((favor(q, k, v) - want).abs().mean())
    return torch.stack(errors).mean().item()


def test_favor_estimator_error_shrinks_with_features():
    """Error ~ 1/√m: 16× more features, ~4× less error (asserted: 2.5×); and small in absolute terms."""
    seeds = range(4)
    err64, err1024 = _favor_error(64, seeds), _favor_error(1024, seeds)
    assert err1024 < err64 / 2.5, (err64, err1024)
    assert err1024 < 0.02, err1024


def test_favor_causal_estimator_error_shrinks_with_features():
    d, length = 16, 48
    torch.manual_seed(0)
    q, k, v = make_qkv(b=1, h=1, length=length, d=d, scale=0.5)
    want = ea.create_attention("softmax", head_dim=d, num_heads=1)(q, k, v, causal=True)
    errors = {}
    for m in (64, 1024):
        favor = ea.create_attention("favor", head_dim=d, num_heads=1, num_features=m, seed=3, chunk_size=5)
        errors[m] = (favor.double()(q, k, v, causal=True) - want).abs().mean().item()
    assert errors[1024] < errors[64] / 2.5 and errors[1024] < 0.03, errors


@pytest.mark.parametrize("name", ALL)
def test_cache_memory_and_decode_step_check_shapes(name):
    """The decoding entry points reject what forward rejects (cached memory: at caching or attending)."""
    attn = build(name)
    q, k, v = make_qkv(b=2, h=2, length=1, s=5, d=8)
    bad = [(k, v[:, :, :4], None), (k[..., :4], v, None), (k, v, torch.zeros(2, 4, dtype=torch.bool))]
    for bad_k, bad_v, mask in bad:  # lengths differ; wrong head_dim; mask of the wrong length
        with pytest.raises(ValueError):
            attn.attend_memory(q, attn.cache_memory(bad_k, bad_v, mask))
    with pytest.raises(ValueError):
        attn.decode_step(q[..., :4], k[:, :, :1, :4], v[:, :, :1])  # wrong head_dim


def test_additive_initialisation_follows_its_fan_in():
    """Uniform(±1/√fan_in) (as nn.Linear): w_q, w_k and the bias by head_dim, w_out by hidden_dim.
    A wrong constant in the bound would change every additive run's starting point."""
    torch.manual_seed(0)
    attn = ea.create_attention("additive", head_dim=64, num_heads=4, hidden_dim=16)
    for param, fan_in in ((attn.w_q, 64), (attn.w_k, 64), (attn.bias, 64), (attn.w_out, 16)):
        bound = fan_in**-0.5
        assert param.abs().max() <= bound
        assert param.abs().max() > 0.8 * bound  # thousands of draws reach near the bound
