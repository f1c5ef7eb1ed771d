"""FAVOR+ specifics: causal prefix sums, random-feature quality, redraws, buffers and seeds."""

import pytest
import torch

import efficient_attn as ea
from efficient_attn.attention.features import gaussian_projection

from .conftest import make_qkv


def favor(**kwargs):
    kwargs.setdefault("num_features", 32)
    return ea.create_attention("favor", head_dim=16, num_heads=2, **kwargs).eval()


@pytest.mark.parametrize("kernel", ["softmax", "softmax_trig", "relu"])
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
