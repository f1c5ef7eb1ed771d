"""FAVOR+ in float32 (and bf16 autocast) against float64 on the same projection, at large norms.

Positive features span hundreds of nats when ‖q‖, ‖k‖ grow (d = 256, std 6: ‖x‖²/2 ≈ 290), far
outside float32, where a fixed key offset would underflow to exact-zero rows (finite, so nothing
warns); the per-key log-scale set against the largest visible key must give float64's answer.
"""

import pytest
import torch

import efficient_attn as ea

from .helpers import decode_sequence

B, H, L, M = 2, 2, 256, 256


def _inputs(d: int, std: float, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, H, L, d, generator=gen, dtype=torch.float64) * std for _ in range(2))
    v = torch.randn(B, H, L, d, generator=gen, dtype=torch.float64)
    mask = torch.zeros(B, L, dtype=torch.bool)
    mask[0, 200:] = True  # right padding
    mask[1, :30] = True  # left padding: under causal, rows 0-29 of batch 1 see nothing
    return q, k, v, mask


def _favor(d: int):
    return ea.create_attention("favor", head_dim=d, num_heads=H, num_features=M, seed=1).eval()


def _row_rel_error(got, want):
    """Relative error per (b, h, row) over rows float64 does not leave empty."""
    norms = want.norm(dim=-1)
    live = norms > 0
    return ((got.double() - want).norm(dim=-1)[live] / norms[live]), live


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_float32_matches_float64_at_large_norms(d, causal):
    attn = _favor(d)
    attn64 = _favor(d).double()
    assert torch.equal(attn64.projection.float(), attn.projection)
    for std in (1.0, 2.0, 3.0, 4.0, 5.0, 6.0):
        q, k, v, mask = _inputs(d, std)
        want = attn64(q, k, v, key_padding_mask=mask, causal=causal)
        got = attn(q.float(), k.float(), v.float(), key_padding_mask=mask, causal=causal)
        rel, live = _row_rel_error(got, want)
        zero_rows = (got.norm(dim=-1) == 0) & live
        assert int(zero_rows.sum()) == 0, f"d={d} std={std}: {int(zero_rows.sum())} zero rows"
        assert rel.median() <= 1e-3, f"d={d} std={std}: median relative error {rel.median():.2e}"
        assert rel.max() <= 1e-2, f"d={d} std={std}: max relative error {rel.max():.2e}"


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [64, 256])
def test_bf16_autocast_matches_float64_on_the_same_inputs(d, causal):
    attn, attn64 = _favor(d), _favor(d).double()
    for std in (1.0, 6.0):
        q, k, v, mask = _inputs(d, std, seed=2)
        q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
        want = attn64(q.double(), k.double(), v.double(), key_padding_mask=mask, causal=causal)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = attn(q, k, v, key_padding_mask=mask, causal=causal)
        assert got.dtype == torch.bfloat16
        rel, live = _row_rel_error(got, want)
        assert int(((got.float().norm(dim=-1) == 0) & live).sum()) == 0
        assert rel.median() <= 2**-8, f"std={std}: median {rel.median():.2e}"  # bf16 output rounding


@pytest.mark.parametrize("d, factor", [(64, 8.0), (128, 4.0), (256, 4.0)])
def test_a_single_visible_key_returns_its_value(d, factor):
    """Causal row 0 sees only key 0: whatever its norm, the output is exactly v_0 (up to rounding)."""
    attn = _favor(d)
    q, k, v, _ = _inputs(d, 1.0)
    q, k, v = q.float(), k.float(), v.float()
    k[:, :, 0] *= factor
    out = attn(q, k, v, causal=True)
    torch.testing.assert_close(out[:, :, 0], v[:, :, 0], rtol=1e-5, atol=1e-6)
    only = attn(q[:, :, :1], k[:, :, :1], v[:, :, :1])  # non-causal over one key
    torch.testing.assert_close(only[:, :, 0], v[:, :, 0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_future_and_padding_cannot_move_a_row_even_by_rounding(chunk):
    """The scale of row t depends only on keys 0..t: a huge future key or a padded one changes
    no earlier output bit (a global key maximum would)."""
    attn = ea.create_attention("favor", head_dim=64, num_heads=H, num_features=M, chunk_size=chunk)
    q, k, v, _ = _inputs(64, 3.0)
    q, k, v = q.float(), k.float(), v.float()
    out = attn(q, k, v, causal=True)
    k2 = k.clone()
    k2[:, :, 100] = k2[:, :, 100] * 0.01  # small norm: its log-scale beats every earlier key's
    k2[:, :, 150] *= 50.0
    out2 = attn(q, k2, v, causal=True)
    assert torch.equal(out2[:, :, :100], out[:, :, :100])
    assert not torch.equal(out2[:, :, 100:], out[:, :, 100:])
    mask = torch.zeros(B, L, dtype=torch.bool)
    mask[:, 200:] = True
    padded = attn(q, k, v, key_padding_mask=mask)
    k3 = k.clone()
    k3[:, :, 200:] = 0.01  # whatever padding holds, even what would set the maximum
    assert torch.equal(attn(q, k3, v, key_padding_mask=mask), padded)


def test_decoding_matches_causal_at_large_norms():
    """Step-by-step decoding and the causal prefix sum, both in float32, each within 1e-4 (per row) of float64:
    elementwise they may differ by float32 rounding on near-zero entries, which depends on the CPU's kernels."""
    attn = _favor(128)
    q, k, v, _ = _inputs(128, 5.0)
    q, k, v = (t[:, :, :40] for t in (q, k, v))
    want = attn(q, k, v, causal=True)  # float64, same projection
    q, k, v = (t.float() for t in (q, k, v))
    full = attn(q, k, v, causal=True)
    stepped = decode_sequence(attn, q, k, v)
    for got in (full, stepped):
        err, live = _row_rel_error(got, want)
        assert live.all() and err.max() < 1e-4, err.max()


@pytest.mark.parametrize("path", ["lean", "generic"])
def test_decoding_rescales_when_a_later_key_dominates(path):
    """Key 0 of huge norm (log-scale hundreds of nats below the next keys'): the decoding state must
    follow the running maximum, or e^{g − G} overflows; the steps must still equal causal forward. Inputs
    that need gradients take ``KernelAttention.decode_step`` (generic), others FAVOR+'s own (lean)."""
    attn = _favor(64)
    q, k, v, _ = _inputs(64, 1.0)
    q, k, v = (t[:, :, :12].float().requires_grad_(path == "generic") for t in (q, k, v))
    with torch.no_grad():
        k[:, :, 0] *= 12.0
    full = attn(q, k, v, causal=True)
    stepped = decode_sequence(attn, q, k, v)
    assert full.isfinite().all()
    torch.testing.assert_close(stepped, full, rtol=1e-4, atol=1e-5)


def test_cached_memory_ignores_nan_in_padded_keys_and_passes_query_gradients():
    """cache_memory/attend_memory (decoder cross-attention) equal the forward: NaN in padded memory
    rows reaches nothing, and gradients through the queries are the forward's."""
    attn = _favor(16).double()
    q, k, v, mask = _inputs(16, 2.0)
    q, k, v = q[:, :, :20].clone(), k.clone(), v.clone()
    k[mask[:, None, :, None].expand_as(k)] = float("nan")
    v[mask[:, None, :, None].expand_as(v)] = float("inf")
    q1, q2 = q.clone().requires_grad_(), q.clone().requires_grad_()
    want = attn(q1, k, v, key_padding_mask=mask)
    got = attn.attend_memory(q2, attn.cache_memory(k, v, mask))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    weights = torch.randn_like(want)
    (want * weights).sum().backward()
    (got * weights).sum().backward()
    torch.testing.assert_close(q2.grad, q1.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_the_generic_path_keeps_padded_keys_off_the_maximum_at_large_norms(causal):
    """``KernelAttention``'s own products (a kernel without a fused path, a prefill) in float32: a padded key
    is zero, so its log-scale (0) would be far above real keys' (−‖k‖²/2√d + …, hundreds of nats below) and,
    taken as the maximum, underflow every real feature to zero rows; masked, the rows match float64."""
    from efficient_attn.attention.kernel import KernelAttention

    attn, attn64 = _favor(64), _favor(64).double()
    q, k, v, mask = _inputs(64, 8.0)
    want = attn64(q, k, v, key_padding_mask=mask, causal=causal)
    pad = mask[:, None, :, None]
    k0, v0 = (t.float().masked_fill(pad, 0.0) for t in (k, v))  # what ``Attention.forward`` hands ``attend``
    got = KernelAttention.attend(attn, q.float(), k0, v0, mask, causal)
    rel, live = _row_rel_error(got, want)
    assert int(((got.norm(dim=-1) == 0) & live).sum()) == 0
    assert rel.max() <= 1e-2, f"max relative error {rel.max():.2e}"
