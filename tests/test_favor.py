"""FAVOR+ specifics: causal prefix sums, random-feature quality, redraws, buffers and seeds."""


import pytest
import torch

import efficient_attn as ea
from efficient_attn.ops.features import (
    gaussian_projection,
    hyperbolic_features,
    positive_features,
)

from .helpers import decode_sequence, make_qkv


def favor(**kwargs):
    kwargs.setdefault("num_features", 32)
    return ea.create_attention("favor", head_dim=16, num_heads=2, **kwargs).eval()


@pytest.mark.parametrize("kernel", ["softmax", "softmax_hyp", "softmax_trig", "relu"])
@pytest.mark.parametrize("chunk", [1, 8, 64])
def test_causal_row_equals_noncausal_over_prefix(kernel, chunk):
    """Row t of causal attention == non-causal attention of q_t over keys 0..t, same features."""
    attn = favor(kernel=kernel, chunk_size=chunk)
    q, k, v = make_qkv(b=2, h=2, length=37, d=16, dtype=torch.float32, scale=0.7)
    out = attn(q, k, v, causal=True)
    for t in range(37):
        row = attn(q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1])
        torch.testing.assert_close(out[:, :, t : t + 1], row, rtol=1e-5, atol=1e-5)


def test_causal_future_outlier_cannot_underflow_the_past():
    """A future key with a huge norm must not change earlier rows (no global-max stabilizer)."""
    attn = favor(num_features=64)
    q, k, v = make_qkv(b=1, h=2, length=20, d=16, dtype=torch.float32)
    out = attn(q, k, v, causal=True)
    k[:, :, 15] *= 1e4
    out2 = attn(q, k, v, causal=True)
    assert torch.equal(out2[:, :, :15], out[:, :, :15])


def _mse_vs_exact(m, orthogonal, seeds, d=16, length=128):
    """Mean over feature draws of the output MSE; moderate logits (positive features are
    heavy-tailed for large ‖q + k‖, which makes small-sample curves noisy)."""
    exact = ea.create_attention("softmax", head_dim=d, num_heads=1)
    q, k, v = make_qkv(b=1, h=1, length=length, d=d, scale=0.5)
    want = exact(q, k, v)
    errors = []
    for seed in seeds:
        attn = ea.create_attention("favor", head_dim=d, num_heads=1, num_features=m,
                                   orthogonal=orthogonal, seed=seed).double()
        errors.append((attn(q, k, v) - want).square().mean())
    return torch.stack(errors).mean().item()


def test_error_against_softmax_falls_with_features():
    errors = [_mse_vs_exact(m, True, range(6)) for m in (8, 32, 128, 512)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < errors[0] / 20, errors  # ~1/m: 64x fewer features, ~48x less error


def test_orthogonal_features_beat_iid():
    orth, iid = (_mse_vs_exact(16, o, range(40)) for o in (True, False))
    assert orth < iid, (orth, iid)


def test_projection_structure():
    torch.manual_seed(0)
    w = gaussian_projection(40, 16, orthogonal=True)  # two full blocks and a half block
    for block in (w[:16], w[16:32], w[32:]):
        gram = block @ block.T
        off_diag = gram - torch.diag(torch.diagonal(gram))
        assert off_diag.abs().max() < 1e-4 * gram.diagonal().max()
    norms = w.norm(dim=1)
    assert norms.std() > 0.1 and abs(norms.square().mean().item() - 16) < 6  # chi_16 norms, E‖w‖² = d
    iid = gaussian_projection(16, 16, orthogonal=False)
    assert (iid @ iid.T - torch.diag((iid @ iid.T).diagonal())).abs().max() > 1.0


def test_redraw_every_n_optimizer_steps_never_in_forward():
    attn = favor(redraw_interval=2).train()
    q, k, v = make_qkv(b=1, h=2, length=5, d=16, dtype=torch.float32)
    seen = [attn.projection.clone()]
    for _ in range(5):
        attn(q, k, v)
        attn(q, k, v)  # a second forward (e.g. an accumulated micro-batch) does not count
        assert torch.equal(attn.projection, seen[-1])
        attn.optimizer_step()
        seen.append(attn.projection.clone())
    assert torch.equal(seen[0], seen[1]) and not torch.equal(seen[1], seen[2])
    assert torch.equal(seen[2], seen[3]) and not torch.equal(seen[3], seen[4])
    assert torch.equal(seen[4], seen[5])
    fixed = favor(redraw_interval=0).train()
    before = fixed.projection.clone()
    for _ in range(4):
        fixed(q, k, v)
        fixed.optimizer_step()
    assert torch.equal(fixed.projection, before)


def test_no_redraw_on_the_final_optimizer_step():
    """redraw_interval == the run's steps: the final step is counted but draws nothing (features no step would
    train with); a resumed run that goes on redraws at its next step."""
    attn = favor(redraw_interval=3).train()
    first = attn.projection.clone()
    ea.attention_optimizer_step(attn)
    ea.attention_optimizer_step(attn)
    ea.attention_optimizer_step(attn, final=True)
    assert torch.equal(attn.projection, first) and attn.feature_redraws == 0 and int(attn.steps_since_draw) == 3
    ea.attention_optimizer_step(attn)  # a longer cap after resuming: the held-back redraw
    assert not torch.equal(attn.projection, first) and attn.feature_redraws == 1
    fixed = favor(redraw_interval=0)
    fixed.final_optimizer_step()
    assert fixed.feature_redraws == 0 and int(fixed.steps_since_draw) == 0


def test_features_are_checkpointed_buffers():
    attn = favor(redraw_interval=1).train()
    q, k, v = make_qkv(b=1, h=2, length=5, d=16, dtype=torch.float32)
    for _ in range(3):
        attn(q, k, v)
        attn.optimizer_step()
    state = attn.state_dict()
    assert {"projection", "num_draws", "draw_seed", "steps_since_draw"} <= set(state)
    restored = favor(redraw_interval=1)
    restored.load_state_dict(state)
    restored.eval(), attn.eval()
    assert torch.equal(restored(q, k, v), attn(q, k, v))


def test_seeding_reproduces_features():
    torch.manual_seed(5)
    a = favor()
    torch.manual_seed(5)
    b = favor()
    assert torch.equal(a.projection, b.projection)
    c, d = favor(seed=3), favor(seed=3)  # explicit seed: independent of the global RNG
    torch.manual_seed(99)
    e = favor(seed=3)
    assert torch.equal(c.projection, d.projection) and torch.equal(c.projection, e.projection)
    assert not torch.equal(favor(seed=4).projection, c.projection)
    c.redraw_features(), d.redraw_features()
    assert torch.equal(c.projection, d.projection) and not torch.equal(c.projection, e.projection)


def test_feature_gradients_when_called_directly():
    """Outside the attention the features' incoming gradient may be shared or expanded: untouched."""
    attn = favor()
    x = torch.randn(1, 2, 6, 16, dtype=torch.float64, requires_grad=True)
    other = torch.randn(1, 2, 6, 32, dtype=torch.float64, requires_grad=True)
    (attn.feature_map(x, is_query=False)[0] + other).sum().backward()  # add shares one grad buffer
    assert torch.equal(other.grad, torch.ones_like(other))
    assert torch.autograd.gradcheck(lambda t: _true_key_features(attn.double(), t), (x,))


def _true_key_features(attn, x):
    """features · exp(log_scale) = exp(Wx − ‖x‖²/2): the returned log-scale is a constant for autograd,
    so the features' own gradient must carry all of it (−‖x‖²/2 included)."""
    phi, log_scale = attn.feature_map(x, is_query=False)
    return phi * log_scale.exp()[..., None]


def test_redraws_do_not_touch_the_global_rng_and_old_checkpoints_load():
    attn = ea.create_attention("favor", head_dim=8, num_heads=2, num_features=4, redraw_interval=1)
    state = torch.get_rng_state()
    attn.train()
    q = torch.randn(1, 2, 5, 8)
    torch.set_rng_state(state)
    before = attn.projection.clone()
    attn(q, q, q)
    attn.optimizer_step()  # redraws
    assert not torch.equal(before, attn.projection)
    assert torch.equal(torch.get_rng_state(), state)
    legacy = {k: v for k, v in attn.state_dict().items() if k != "draw_seed"}  # saved before draw_seed existed
    fresh = ea.create_attention("favor", head_dim=8, num_heads=2, num_features=4)
    fresh.load_state_dict(legacy)
    assert torch.equal(fresh.projection, attn.projection)


def test_hyperbolic_features_are_positive_features_of_plus_minus_w_with_gradients():
    """φ_hyp(x; w) = φ_+(x; [w; −w]): values, log-scales, and first and second derivatives."""
    torch.manual_seed(0)
    w = torch.randn(5, 8, dtype=torch.float64)
    x = torch.randn(2, 1, 4, 8, dtype=torch.float64, requires_grad=True)
    for is_query in (True, False):
        phi, g = hyperbolic_features(x, w, is_query)
        ref, g_ref = positive_features(x, torch.cat([w, -w]), is_query)
        assert phi.shape == (2, 1, 4, 10) and torch.equal(phi, ref)
        assert (g is None) == is_query and (is_query or torch.equal(g, g_ref))
        assert phi.max() <= 1 and torch.allclose(phi.amax(-1), torch.ones(2, 1, 4, dtype=torch.float64))
        if not is_query:  # the true features: exp(−‖x‖²/2)[e^{wᵀx}, e^{−wᵀx}]
            logits = x.detach() @ w.T
            want = torch.exp(torch.cat([logits, -logits], -1) - x.detach().square().sum(-1, keepdim=True) / 2)
            torch.testing.assert_close(phi * g.exp()[..., None], want, rtol=1e-13, atol=0)

    def true_keys(t):
        phi, g = hyperbolic_features(t, w, False)
        return phi * g.exp()[..., None]

    assert torch.autograd.gradcheck(true_keys, (x,))
    assert torch.autograd.gradgradcheck(true_keys, (x,))

    def query_ratios(t):  # a query's dropped scale is one factor per row: ratios within a row are exact
        phi = hyperbolic_features(t, w, True)[0]
        return phi / phi.sum(-1, keepdim=True)

    assert torch.autograd.gradcheck(query_ratios, (x,))
    attn = favor(kernel="softmax_hyp", num_features=6).double()
    x2 = torch.randn(1, 2, 3, 16, dtype=torch.float64, requires_grad=True)
    assert attn.feature_map(x2, is_query=True)[0].shape[-1] == 12
    assert torch.autograd.gradcheck(lambda t: _true_key_features(attn, t), (x2,))


@pytest.mark.parametrize("causal", [False, True])
def test_hyperbolic_attention_gradcheck(causal):
    attn = favor(kernel="softmax_hyp", num_features=5, chunk_size=2).double()
    q, k, v = make_qkv(b=1, h=2, length=5, d=16, scale=0.7)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(lambda a, b, c: attn(a, b, c, causal=causal), (q, k, v))


@pytest.mark.parametrize("kw", [dict(kernel="softmax_hyp"), dict(projection="simplex")])
def test_new_options_decode_like_causal_attention(kw):
    attn = favor(**kw, num_features=16).double()
    q, k, v = make_qkv(b=2, h=2, length=9, d=16, scale=1.5)
    torch.testing.assert_close(decode_sequence(attn, q, k, v), attn(q, k, v, causal=True), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kernel", ["softmax", "softmax_hyp"])
def test_decoding_follows_every_change_of_the_projection(kernel):
    """Decoding's cached step projection is made again whenever the features change between steps: a
    redraw, a load, an in-place edit, a new buffer, a cast; decoding always equals the causal forward."""
    attn = favor(kernel=kernel, num_features=16, seed=1).double()
    q, k, v = make_qkv(b=2, h=2, length=5, d=16)

    def check(module, rtol=1e-10, atol=1e-12):
        a, b, c = (t.to(module.projection.dtype) for t in (q, k, v))
        got = decode_sequence(module, a, b, c)
        torch.testing.assert_close(got, module(a, b, c, causal=True), rtol=rtol, atol=atol)
        return got

    first = check(attn)
    attn.redraw_features()  # written in place
    assert not torch.allclose(check(attn), first)
    attn.load_state_dict(favor(kernel=kernel, num_features=16, seed=2).double().state_dict())
    check(attn)
    with torch.no_grad():
        attn.projection.mul_(0.5)
    check(attn)
    attn.projection = torch.randn(16, 16, dtype=torch.float64)  # another tensor
    check(attn)
    check(attn.float(), rtol=1e-5, atol=1e-6)  # a cast
    assert attn._step_cache[1][2] == torch.float32


def test_decoding_with_gradients_equals_decoding_without():
    """A step whose q or k needs a gradient makes its features through ``feature_map`` (differentiable);
    its outputs are those of the no-gradient step, and a backward through the steps runs."""
    attn = favor(num_features=16).double()
    q, k, v = make_qkv(b=2, h=2, length=6, d=16)
    plain = decode_sequence(attn, q, k, v)
    q2, k2 = q.clone().requires_grad_(), k.clone().requires_grad_()
    tracked = decode_sequence(attn, q2, k2, v)
    torch.testing.assert_close(tracked, plain, rtol=1e-10, atol=1e-12)
    tracked.square().sum().backward()
    assert torch.isfinite(q2.grad).all() and torch.isfinite(k2.grad).all() and k2.grad.abs().sum() > 0
