"""Properties every registered attention must have, parametrized over list_attentions()."""

import pytest
import torch

import efficient_attn as ea
from efficient_attn.attention.base import unsupported_use

from .helpers import assert_causal_rows_ignore_the_future, make_qkv, skip_unsupported
from .test_reference import UNNORMALISED

ALL = ea.list_attentions()


def build(name, d=8, h=2, dtype=torch.float64):
    """cosFormer with a fixed M (max_len 16): by default M is the padded length, which padding would move."""
    torch.manual_seed(1)
    kwargs = {"max_len": 16} if name == "cosformer" else {}
    return ea.create_attention(name, head_dim=d, num_heads=h, **kwargs).to(dtype).eval()


@pytest.mark.parametrize("name", ALL)
def test_causal_rows_ignore_the_future(name):
    attn = build(name)
    q, k, v = make_qkv(length=16)
    assert_causal_rows_ignore_the_future(attn, q, k, v, (0, 5, 11, 14), exact=False)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", ALL)
def test_padding_invariance(name, causal):
    """Padded keys hold huge values: the output equals attention over the real keys alone."""
    attn = build(name, dtype=torch.float32)
    q, k, v = make_qkv(b=2, length=14, dtype=torch.float32)
    n_real = 10
    mask = torch.zeros(2, 14, dtype=torch.bool)
    mask[:, n_real:] = True
    k[:, :, n_real:], v[:, :, n_real:] = 1e30, -1e30
    k[1, :, -1] = float("inf")
    v[1, :, -1] = float("nan")
    skip_unsupported(name, lambda: attn(q, k, v, key_padding_mask=mask, causal=causal), causal=causal)
    out = attn(q, k, v, key_padding_mask=mask, causal=causal)
    assert out.isfinite().all()
    if causal or unsupported_use(type(attn), causal=False, cross=True):
        # rows < n_real see only real keys (later rows see the same real keys as row n_real-1 under causal);
        # without cross-attention, the real rows against self-attention over the real keys alone
        want = attn(q[:, :, :n_real], k[:, :, :n_real], v[:, :, :n_real], causal=causal)
        torch.testing.assert_close(out[:, :, :n_real], want, rtol=1e-5, atol=1e-6)
    else:
        want = attn(q, k[:, :, :n_real], v[:, :, :n_real])
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", ALL)
def test_rows_with_no_visible_key_are_zero(name, causal):
    attn = build(name)
    q, k, v = make_qkv(b=2, length=9)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0] = True  # nothing visible at all
    mask[1, :3] = True  # left padding: causal rows 0-2 see nothing
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    skip_unsupported(name, lambda: attn(q, k, v, key_padding_mask=mask, causal=causal), causal=causal)
    out = attn(q, k, v, key_padding_mask=mask, causal=causal)
    assert out.isfinite().all()
    assert (out[0] == 0).all()
    if causal:
        assert (out[1, :, :3] == 0).all() and (out[1, :, 3:] != 0).any()
    out.square().sum().backward()
    for t in (q, k, v):
        assert t.grad.isfinite().all()
    assert (k.grad[:, :, :3][1] == 0).all() and (v.grad[1, :, :3] == 0).all()  # padded keys get no gradient


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", ALL)
def test_weights_sum_to_one(name, causal):
    """A constant value vector comes out unchanged: every row's weights sum to one."""
    if name in UNNORMALISED:
        pytest.skip(f"{name} is unnormalised: its weights need not sum to one (normalised outside the core)")
    attn = build(name)
    q, k, _ = make_qkv(length=10)
    v = torch.full((2, 2, 10, 3), 2.5, dtype=torch.float64)
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[1, 7:] = True
    out = attn(q, k, v, key_padding_mask=mask, causal=causal)
    torch.testing.assert_close(out, torch.full_like(out, 2.5), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ALL)
def test_gradients_reach_q_k_v_and_parameters(name):
    """Through cross-attention, or self-attention (causal if it must be) for variants without it."""
    attn = build(name)
    cross = unsupported_use(type(attn), causal=False, cross=True) is None
    causal = unsupported_use(type(attn), causal=False, cross=False) is not None
    q, k, v = make_qkv(length=7, s=9 if cross else 7)
    for t in (q, k, v):
        t.requires_grad_()
    (attn(q, k, v, causal=causal) * torch.randn(2, 2, 7, 8, dtype=torch.float64)).sum().backward()
    for t in (q, k, v):
        assert t.grad.isfinite().all() and t.grad.abs().sum() > 0
    for p in attn.parameters():
        assert p.grad is not None and p.grad.isfinite().all() and p.grad.abs().sum() > 0


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", ALL)
def test_gradcheck(name, causal):
    attn = build(name, d=4, h=1)
    q, k, v = make_qkv(b=1, h=1, length=5, d=4)
    mask = torch.tensor([[False, False, False, False, True]])
    inputs = tuple(t.requires_grad_() for t in (q, k, v))
    skip_unsupported(name, lambda: attn(q, k, v, key_padding_mask=mask, causal=causal), causal=causal)
    assert torch.autograd.gradcheck(
        lambda q, k, v: attn(q, k, v, key_padding_mask=mask, causal=causal), inputs
    )


def _bad(attn, q, k, v, **kw):
    with pytest.raises(ValueError) as info:
        attn(q, k, v, **kw)
    return str(info.value)


@pytest.mark.parametrize("name", ALL)
def test_bad_inputs_raise_with_shapes(name):
    attn = build(name, dtype=torch.float32)
    q, k, v = make_qkv(b=2, h=2, length=6, s=5, d=8, dtype=torch.float32)
    assert "(2, 2, 6, 8)" in _bad(attn, q, k, v, causal=True)  # causal cross-attention
    assert "4-D" in _bad(attn, q[0], k, v)
    assert "batch" in _bad(attn, q, k[:1], v[:1])
    assert "length S" in _bad(attn, q, k, v[:, :, :4])
    assert "heads of dim 8" in _bad(attn, q[..., :4], k[..., :4], v)
    assert "heads of dim 8" in _bad(attn, q[:, :1], k[:, :1], v[:, :1])
    assert "dtype" in _bad(attn, q.double(), k, v)
    assert "key_padding_mask" in _bad(attn, q, k, v, key_padding_mask=torch.zeros(2, 5))
    assert "key_padding_mask" in _bad(attn, q, k, v, key_padding_mask=torch.zeros(2, 6, dtype=torch.bool))
