"""Second derivatives are exact (gradgradcheck in float64), never silently dropped.

The hand-written backward passes run in place under no_grad; with ``create_graph=True`` each
Function differentiates a plain re-computation instead (efficient_attn/ops/differentiable.py).
"""

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import efficient_attn as ea
from efficient_attn.attention.additive import _AdditiveScores
from efficient_attn.ops.causal_linear import causal_linear_attention

from .helpers import make_qkv, skip_unsupported


def _leaf(*shape, positive=False):
    t = torch.randn(*shape, dtype=torch.float64)
    return (t.abs() + 0.1 if positive else t).requires_grad_()


@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("length, chunk", [(11, 4), (12, 4), (11, 11), (9, 1)])
def test_causal_linear_first_and_second_derivatives_across_chunks(length, chunk, scaled):
    q, k = _leaf(1, 2, length, 3, positive=True), _leaf(1, 2, length, 3, positive=True)
    v = _leaf(1, 2, length, 2)
    # log-scales that rise inside and across chunks, so the running maximum and rescaling both act
    g = (torch.randn(1, 2, length, dtype=torch.float64) * 3).cumsum(-1) if scaled else None
    fn = lambda a, b, c: causal_linear_attention(a, b, c, chunk, g)
    assert gradcheck(fn, (q, k, v))
    assert gradgradcheck(fn, (q, k, v))


def test_additive_scores_second_derivatives():
    qp, kp, w = _leaf(1, 2, 5, 3), _leaf(1, 2, 4, 3), _leaf(2, 3)
    assert gradgradcheck(lambda a, b, c: _AdditiveScores.apply(a, b, c, 2), (qp, kp, w))


def test_positive_key_features_second_derivatives():
    """Keys' whole function exp(Wx − ‖x‖²/2) = features · e^{log_scale} (the log-scale is a constant
    for autograd, so the features' derivatives carry all of it). Queries' maps are checked through
    the attention below (their row maximum cancels only in the attention's ratio)."""
    attn = ea.create_attention("favor", head_dim=4, num_heads=2, num_features=6).double()
    x = _leaf(1, 2, 5, 4)

    def fn(t):
        phi, log_scale = attn.feature_map(t, is_query=False)
        return phi * log_scale.exp()[..., None]

    assert gradcheck(fn, (x,))
    assert gradgradcheck(fn, (x,))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", ea.list_attentions())
def test_every_attention_second_derivatives(name, causal):
    torch.manual_seed(0)
    attn = ea.create_attention(name, head_dim=4, num_heads=2, **(
        {"chunk_size": 3} if name in ("favor", "linear") else {})).double().eval()
    q, k, v = (t.requires_grad_() for t in make_qkv(b=1, h=2, length=7, d=4))
    mask = torch.zeros(1, 7, dtype=torch.bool)
    mask[0, 5:] = True
    fn = lambda a, b, c: attn(a, b, c, key_padding_mask=mask, causal=causal)
    skip_unsupported(name, lambda: fn(q, k, v), causal=causal)
    try:
        assert gradgradcheck(fn, (q, k, v), atol=1e-5)
    except RuntimeError as err:  # an error is acceptable, a wrong number is not
        assert name in SDPA_BASED and "not implemented" in str(err), err


# torch's fused CPU attention kernels have no double backward: asking for one raises in torch
SDPA_BASED = {"softmax", "dot", "bilinear"}


@pytest.mark.parametrize("name", ["linear", "favor", "additive"])
def test_gradient_penalty_matches_plain_autograd(name):
    """A gradient penalty ‖∂L/∂x‖² through the module, against the same penalty
    with every custom Function replaced by its plain re-computation (float64)."""
    torch.manual_seed(0)
    mha = ea.MultiHeadAttention(8, 2, attention=name, attention_kwargs=(
        {"chunk_size": 3} if name != "additive" else {"chunk_size": 2})).double()
    x = torch.randn(2, 10, 8, dtype=torch.float64, requires_grad=True)

    def penalty():
        (grad,) = torch.autograd.grad(mha(x, causal=True).square().sum(), x, create_graph=True)
        return grad.square().sum()

    (got,) = torch.autograd.grad(penalty(), mha.q_proj.weight)
    with _plain_functions():
        (want,) = torch.autograd.grad(penalty(), mha.q_proj.weight)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    assert got.abs().max() > 1e-6


class _plain_functions:
    """Swap the custom Functions for their plain-autograd twins (the second-derivative path)."""

    def __enter__(self):
        from efficient_attn.attention import additive, favor
        from efficient_attn.ops import causal_linear, favor_fused, features

        self.saved = [
            (causal_linear, "causal_linear_attention", causal_linear.causal_linear_attention),
            (additive._AdditiveScores, "apply", additive._AdditiveScores.apply),
            (features._PositiveFeatures, "apply", features._PositiveFeatures.apply),
            (favor, "favor_positive_attention", favor.favor_positive_attention),
        ]

        def favor_plain(q, k, v, w, scale, mask, causal, chunk, recompute=False):  # recompute: no effect here
            from efficient_attn.ops.numerics import with_ones

            b, h, length, _ = q.shape
            flat = [t.reshape(b * h, t.shape[2], -1) for t in (q, k, with_ones(v, mask))]
            pad = None if mask is None else mask[:, None, :].expand(b, h, -1).reshape(b * h, -1)
            return favor_fused._favor_plain(*flat, w, scale, pad, causal).reshape(b, h, length, -1)

        def causal_plain(phi_q, phi_k, v, chunk, g=None):
            b, h, length, _ = phi_q.shape
            flat = [t.reshape(b * h, length, -1) for t in (phi_q, phi_k, v)]
            gg = None if g is None else g.detach().reshape(b * h, length)
            return causal_linear.causal_plain(*flat, gg).reshape(b, h, length, -1)

        def positive_plain(x, w, is_query, fresh_grad):
            phi = features.positive_features_plain(x, w, is_query)
            return phi, (x @ w.T).amax(-1).detach()

        causal_linear.causal_linear_attention = causal_plain
        additive._AdditiveScores.apply = staticmethod(lambda qp, kp, w, rows: additive._scores_plain(qp, kp, w))
        features._PositiveFeatures.apply = staticmethod(positive_plain)
        favor.favor_positive_attention = favor_plain
        from efficient_attn.attention import kernel
        self.kernel_saved = kernel.causal_linear_attention
        kernel.causal_linear_attention = causal_plain
        return self

    def __exit__(self, *exc):
        from efficient_attn.attention import kernel

        for owner, attr, value in self.saved:
            setattr(owner, attr, value if attr != "apply" else staticmethod(value) if False else value)
        kernel.causal_linear_attention = self.kernel_saved
        return False
