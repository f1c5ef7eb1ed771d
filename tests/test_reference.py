"""Every variant against a float64 reference written out plainly from its formula.

Each reference builds the (L, S) matrix of unnormalized attention weights K[i, j] for one
(batch, head), keeps the visible keys, and normalizes rows: out_i = Σ_j K_ij v_j / Σ_j K_ij.
Variants that see only a band of keys by design (sliding window) add it to the visible keys
(``REFERENCE_BANDS``); unnormalised variants (retention) are out_i = Σ_j K_ij v_j (``UNNORMALISED``).
"""

import math

import pytest
import torch
import torch.nn.functional as F

import efficient_attn as ea
from efficient_attn.ops.features import KERNELS

from .helpers import make_qkv, skip_unsupported
from .recurrent_reference import GATES, recurrent_reference


def kernel_softmax(attn, q, k, h):
    return torch.exp(q @ k.T * attn.scale)


def kernel_dot(attn, q, k, h):
    return torch.exp(q @ k.T)


def kernel_bilinear(attn, q, k, h):
    return torch.exp(attn.scale * q @ attn.weight[h] @ k.T)


def kernel_additive(attn, q, k, h):
    """exp(w_hᵀ tanh(W_q q_i + W_k k_j + b)) for every pair (i, j) at once: (L, S)."""
    hidden = torch.tanh((q @ attn.w_q[h])[:, None] + (k @ attn.w_k[h])[None, :] + attn.bias[h])  # (L, S, n)
    return torch.exp(hidden @ attn.w_out[h])


def kernel_linear(attn, q, k, h):
    return (F.elu(q) + 1) @ (F.elu(k) + 1).T


def kernel_favor(attn, q, k, h):
    """Performer's features, unstabilized: φ(x) = exp(Wx − ‖x‖²/2)/√m (or hyperbolic / trig / relu)."""
    w = attn.projection.double()
    m = w.shape[0]
    x_q, x_k = q * attn.head_dim**-0.25, k * attn.head_dim**-0.25
    if attn.kernel == "softmax":
        phi = lambda x: torch.exp(x @ w.T - (x * x).sum(-1, keepdim=True) / 2) / math.sqrt(m)
    elif attn.kernel == "softmax_hyp":  # exp(−‖x‖²/2)[exp(Wx), exp(−Wx)]/√(2m)
        phi = lambda x: torch.exp(-(x * x).sum(-1, keepdim=True) / 2) * torch.cat(
            [torch.exp(x @ w.T), torch.exp(-x @ w.T)], -1) / math.sqrt(2 * m)
    elif attn.kernel == "softmax_trig":
        phi = lambda x: torch.exp((x * x).sum(-1, keepdim=True) / 2) * torch.cat(
            [torch.sin(x @ w.T), torch.cos(x @ w.T)], -1) / math.sqrt(m)
    else:
        phi = lambda x: (torch.relu(x @ w.T) + attn.kernel_eps) / math.sqrt(m)
    return phi(x_q) @ phi(x_k).T


def kernel_taylor(attn, q, k, h):
    """Based: 1 + t + t²/2 with t = q̃·k̃/√d', q̃ = q W_h, k̃ = k W_h (2nd-order Taylor of exp(t))."""
    t = (q @ attn.weight[h]) @ (k @ attn.weight[h]).T / math.sqrt(attn.feature_dim)
    return 1 + t + t**2 / 2


def kernel_hedgehog(attn, q, k, h):
    """Hedgehog: φ(x) = [softmax(x W_h + b_h), softmax(−(x W_h + b_h))], K = φ_q(q)·φ_k(k) (no q, k scaling)."""
    k_weight, k_bias = (attn.weight, attn.bias) if attn.tied else (attn.k_weight, attn.k_bias)  # φ_k
    q_low, k_low = q @ attn.weight[h] + attn.bias[h], k @ k_weight[h] + k_bias[h]  # (L, d'), (S, d')
    positive = torch.softmax(q_low, -1) @ torch.softmax(k_low, -1).T  # (L, S)
    negative = torch.softmax(-q_low, -1) @ torch.softmax(-k_low, -1).T  # (L, S)
    return positive + negative


def kernel_cosformer(attn, q, k, h):
    """(ReLU(q_i) + ε)·(ReLU(k_j) + ε) · cos(π/2 · (i − j)/M), i, j the row and column indices,
    M = max_len, or max(L, S) (the official code's m) when max_len is None."""
    i = torch.arange(q.shape[0], dtype=torch.float64)[:, None]
    j = torch.arange(k.shape[0], dtype=torch.float64)[None, :]
    horizon = max(q.shape[0], k.shape[0]) if attn.max_len is None else attn.max_len
    relu = (torch.relu(q) + attn.kernel_eps) @ (torch.relu(k) + attn.kernel_eps).T
    return relu * torch.cos(math.pi / 2 * (i - j) / horizon)


def kernel_retention(attn, q, k, h):
    """γ_h^{i−j} · scale · q_i·k_j, unnormalised (the causal mask keeps j ≤ i)."""
    gap = torch.arange(q.shape[0])[:, None] - torch.arange(k.shape[0])[None, :]  # (L, S): i − j
    return attn.gammas[h] ** gap.clamp_min(0).double() * (q @ k.T) * attn.scale


def band_sliding_window(attn, length, s):
    """|i − j| < window (with the causal mask: i − window < j ≤ i)."""
    gap = torch.arange(length)[:, None] - torch.arange(s)[None, :]  # (L, S): i − j
    return gap.abs() < attn.window


REFERENCE_KERNELS = {
    "softmax": kernel_softmax, "dot": kernel_dot, "bilinear": kernel_bilinear,
    "additive": kernel_additive, "linear": kernel_linear, "favor": kernel_favor,
    "taylor": kernel_taylor, "cosformer": kernel_cosformer, "hedgehog": kernel_hedgehog,
    "sliding_window": kernel_softmax, "retention": kernel_retention,
}
# variants that see only some keys by design: name -> (attn, L, S) -> (L, S) bool, True = may attend
REFERENCE_BANDS = {"sliding_window": band_sliding_window}
# variants whose output is Σ_j K_ij v_j, not divided by Σ_j K_ij (RetNet normalises outside the core), and the
# token-gated recurrences, whose references are loops over tokens (tests/recurrent_reference.py)
UNNORMALISED = {"retention", *GATES}
WITH_REFERENCE = set(REFERENCE_KERNELS) | set(GATES)


def reference(name, attn, q, k, v, mask=None, causal=False):
    if name in GATES:
        assert causal, f"{name} is causal-only"
        return recurrent_reference(name, attn, q, k, v, mask)
    B, H, L, _ = q.shape
    S = k.shape[2]
    out = torch.zeros(B, H, L, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            K = REFERENCE_KERNELS[name](attn, q[b, h], k[b, h], h)  # (L, S)
            visible = torch.ones(L, S, dtype=torch.bool)
            if mask is not None:
                visible &= ~mask[b][None, :]
            if causal:
                visible &= torch.ones(L, S, dtype=torch.bool).tril()
            if name in REFERENCE_BANDS:
                visible &= REFERENCE_BANDS[name](attn, L, S)
            K = torch.where(visible, K, torch.zeros_like(K))
            seen = visible.any(-1)  # (L,): rows that see no key stay zero
            if name in UNNORMALISED:
                out[b, h, seen] = (K @ v[b, h])[seen]
            else:
                out[b, h, seen] = (K @ v[b, h])[seen] / K.sum(-1, keepdim=True)[seen]
    return out


def build(name, d=8, h=2, **kwargs):
    torch.manual_seed(1)
    return ea.create_attention(name, head_dim=d, num_heads=h, **kwargs).double().eval()


def test_every_registered_attention_has_a_reference():
    """A new variant must come with its float64 reference: a missing one fails, it is not skipped."""
    missing = sorted(set(ea.list_attentions()) - WITH_REFERENCE)
    assert not missing, f"no float64 reference in tests/test_reference.py for {missing}"


def test_additive_reference_agrees_with_the_pairwise_loop():
    """The vectorized additive kernel == the formula written pair by pair."""
    attn = build("additive", hidden_dim=5)
    q, k, _ = make_qkv(b=1, h=1, length=4, s=3, d=8)
    q, k = q[0, 0], k[0, 0]
    loop = torch.empty(4, 3, dtype=torch.float64)
    for i in range(4):
        for j in range(3):
            hidden = torch.tanh(q[i] @ attn.w_q[1] + k[j] @ attn.w_k[1] + attn.bias[1])
            loop[i, j] = torch.exp(attn.w_out[1] @ hidden)
    torch.testing.assert_close(kernel_additive(attn, q, k, 1), loop, rtol=1e-13, atol=0)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", ea.list_attentions())
def test_matches_reference(name, causal):
    if name not in WITH_REFERENCE:
        pytest.fail(f"no float64 reference written for {name!r}")
    attn = build(name)
    q, k, v = make_qkv(b=2, h=2, length=11, d=8, dv=5)
    mask = torch.zeros(2, 11, dtype=torch.bool)
    mask[0, 8:] = True  # right padding
    mask[1, :2] = True  # left padding: under causal, rows 0-1 see nothing -> zeros
    skip_unsupported(name, lambda: attn(q, k, v, causal=causal), causal=causal)
    for m in (None, mask):
        got = attn(q, k, v, key_padding_mask=m, causal=causal)
        want = reference(name, attn, q, k, v, m, causal)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("name", ea.list_attentions())
def test_cross_attention_matches_reference(name):
    if name not in WITH_REFERENCE:
        pytest.fail(f"no float64 reference written for {name!r}")
    attn = build(name)
    q, k, v = make_qkv(b=2, h=2, length=5, s=9, d=8, dv=3)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[1, 6:] = True
    skip_unsupported(name, lambda: attn(q, k, v, key_padding_mask=mask), cross=True)
    got = attn(q, k, v, key_padding_mask=mask)
    torch.testing.assert_close(got, reference(name, attn, q, k, v, mask), rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kernel", KERNELS)
def test_favor_kernels_match_reference(kernel, causal):
    attn = build("favor", num_features=24, kernel=kernel, chunk_size=4)
    q, k, v = make_qkv(b=1, h=2, length=13, d=8, scale=0.5)
    got = attn(q, k, v, causal=causal)
    torch.testing.assert_close(got, reference("favor", attn, q, k, v, None, causal), rtol=1e-10, atol=1e-11)


def test_favor_stabilizer_exact_for_large_logits():
    """Large ‖q‖, ‖k‖: the stabilized features still give the unstabilized formula's output."""
    attn = build("favor", d=16, num_features=64)
    q, k, v = make_qkv(b=1, h=2, length=10, d=16, scale=3.0)
    torch.testing.assert_close(attn(q, k, v), reference("favor", attn, q, k, v), rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_additive_chunking_is_exact(chunk):
    torch.manual_seed(3)
    attn = ea.create_attention("additive", head_dim=8, num_heads=2, chunk_size=chunk).double()
    q, k, v = make_qkv(length=10, s=7, d=8)
    q.requires_grad_()
    got = attn(q, k, v)
    got.sum().backward()
    want = reference("additive", attn, q.detach(), k, v)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-11)
    grad_chunked = q.grad.clone()
    q.grad = None
    attn.chunk_size = 10_000
    attn(q, k, v).sum().backward()
    torch.testing.assert_close(grad_chunked, q.grad)


@pytest.mark.parametrize("rows", [1, 2, 5])
def test_additive_scores_gradcheck_including_parameters(rows):
    from efficient_attn.attention.additive import _AdditiveScores

    qp = torch.randn(1, 2, 5, 3, dtype=torch.float64, requires_grad=True)
    kp = torch.randn(1, 2, 4, 3, dtype=torch.float64, requires_grad=True)
    w_out = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, w: _AdditiveScores.apply(a, b, w, rows), (qp, kp, w_out))
