"""Training memory of the kernel attentions: what a forward keeps for backward (a memory property, not a timing).

With ``recompute`` (the default) a kernel attention keeps q, k, v, its output and normalizer, never
its (B, H, L, M) features, the feature map's intermediates, or per-chunk score blocks and states. Counted with
``efficient_attn_tasks.bench.saved.saved_for_backward`` (saved-tensor hooks plus the tensors custom Functions keep
as attributes), each storage once, parameters left out.
"""

from __future__ import annotations

import pytest
import torch

import efficient_attn as ea
from efficient_attn_tasks.bench.saved import saved_for_backward

B, H, L, D = 2, 2, 256, 16
CASES = [
    ("linear", {}),
    ("cosformer", {}),
    ("hedgehog", {}),
    ("taylor", {"feature_dim": 4}),  # 1 + 4 + 16 = 21 features
    ("favor", {"num_features": 64}),  # fused positive features, m = 4·D
    ("favor", {"num_features": 64, "kernel": "softmax_trig"}),  # the generic path, 2m = 8·D features
]


def _saved(name: str, options: dict, causal: bool, recompute: bool) -> list:
    torch.manual_seed(0)
    attn = ea.create_attention(name, head_dim=D, num_heads=H, recompute=recompute, **options).train()
    q, k, v = (torch.randn(B, H, L, D, requires_grad=True) for _ in range(3))
    return saved_for_backward(attn, lambda: attn(q, k, v, causal=causal).sum())


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("name,options", CASES, ids=[f"{n}-{o.get('kernel', '')}" for n, o in CASES])
def test_recompute_keeps_only_inputs_and_output(name, options, causal):
    """At most five (B, H, L, D+1) float32 tensors (q, k, [v, 1], the output and a spare) and nothing of
    B·H·L·M elements (the features, M ≥ D + 5 here, would exceed both bounds)."""
    if name == "favor" and options.get("kernel") is None and not causal:
        pytest.skip("the fused non-causal FAVOR+ keeps its features (recompute covers the causal form)")
    rows = _saved(name, options, causal, recompute=True)
    unit = B * H * L * (D + 1) * 4
    total = sum(r.nbytes for r in rows)
    assert total <= 5 * unit, [(r.node, r.field, r.shape, r.nbytes) for r in rows]
    biggest = max(r.nbytes for r in rows)
    assert biggest <= unit, [(r.node, r.shape) for r in rows if r.nbytes > unit]


def _softmax_saved(causal: bool) -> int:
    """Bytes softmax (SDPA) keeps for backward on the same inputs: q, k, v, the output and its log-sum-exp."""
    torch.manual_seed(0)
    attn = ea.create_attention("softmax", head_dim=D, num_heads=H).train()
    q, k, v = (torch.randn(B, H, L, D, requires_grad=True) for _ in range(3))
    return sum(r.nbytes for r in saved_for_backward(attn, lambda: attn(q, k, v, causal=causal).sum()))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("name,options", CASES, ids=[f"{n}-{o.get('kernel', '')}" for n, o in CASES])
def test_recompute_keeps_at_most_what_softmax_keeps(name, options, causal):
    """Byte for byte no more than softmax: q, k, v (not [v, 1]), the output and one (B, H, L) statistic."""
    if name == "favor" and options.get("kernel") is None and not causal:
        pytest.skip("the fused non-causal FAVOR+ keeps its features (recompute covers the causal form)")
    rows = _saved(name, options, causal, recompute=True)
    assert sum(r.nbytes for r in rows) <= _softmax_saved(causal), [(r.node, r.shape, r.nbytes) for r in rows]


def test_fused_favor_recompute_is_bit_identical():
    """Causal fused FAVOR+ with ``recompute`` gives the very bits of the kept-features path (float32), output and
    gradients: the log-scales and [v, 1] made again in backward are the forward's."""
    results = []
    for recompute in (False, True):
        torch.manual_seed(0)
        attn = ea.create_attention("favor", head_dim=D, num_heads=H, num_features=64, recompute=recompute,
                                   chunk_size=32).train()
        torch.manual_seed(1)
        q, k, v = (torch.randn(B, H, 70, D, requires_grad=True) for _ in range(3))
        out = attn(q, k, v, causal=True)
        results.append((out, torch.autograd.grad(out, (q, k, v), torch.randn(out.shape))))
    (out0, grads0), (out1, grads1) = results
    assert torch.equal(out1, out0) and all(torch.equal(a, b) for a, b in zip(grads1, grads0))


def test_without_recompute_favor_keeps_its_features():
    """The bound above is not vacuous: without recompute FAVOR+ keeps (B·H, L, m) features and chunk states."""
    rows = _saved("favor", {"num_features": 64}, True, recompute=False)
    assert sum(r.nbytes for r in rows) > 5 * B * H * L * (D + 1) * 4


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("name,options", CASES, ids=[f"{n}-{o.get('kernel', '')}" for n, o in CASES])
def test_recompute_off_is_plain_autograd(name, options, causal):
    """``recompute=False`` takes the plain path, which keeps more than the recompute path (its features)."""
    if name == "favor" and options.get("kernel") is None and not causal:
        pytest.skip("the fused non-causal FAVOR+ keeps its features either way")
    plain = sum(r.nbytes for r in _saved(name, options, causal, recompute=False))
    assert plain > sum(r.nbytes for r in _saved(name, options, causal, recompute=True))


@pytest.mark.parametrize("name,options", CASES, ids=[f"{n}-{o.get('kernel', '')}" for n, o in CASES])
def test_recompute_matches_kept_features(name, options):
    """Same output, same gradients (float64; q, k, v and the module's parameters), causal and not."""
    for causal in (True, False):
        results = []
        for recompute in (False, True):
            torch.manual_seed(0)
            attn = ea.create_attention(name, head_dim=D, num_heads=H, recompute=recompute, chunk_size=32,
                                       **options).double().train()
            torch.manual_seed(1)
            q, k, v = (torch.randn(B, H, 70, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
            mask = torch.zeros(B, 70, dtype=torch.bool)
            mask[0, -9:] = True
            out = attn(q, k, v, causal=causal, key_padding_mask=None if causal else mask)
            inputs = [q, k, v, *attn.parameters()]
            results.append((out, torch.autograd.grad(out, inputs, torch.randn(out.shape, dtype=out.dtype))))
        (out0, grads0), (out1, grads1) = results
        torch.testing.assert_close(out1, out0, rtol=1e-12, atol=1e-12)
        for g1, g0 in zip(grads1, grads0):
            torch.testing.assert_close(g1, g0, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name,options,bound", [("cosformer", {}, 12.5), ("hedgehog", {}, 13.5), ("linear", {}, 7.25)])
def test_backward_holds_the_features_or_a_map_graph_not_both(name, options, bound):
    """Backward's working set (the most bytes live at once above what forward kept, gradients for q, k, v
    included), in (B, H, L, D) float32 units, for 2D-wide features (cosFormer, Hedgehog) and D-wide (linear):
    the re-made features and their gradients, or one feature map's graph, but not both maps' graphs (for
    Hedgehog a second copy of the features) beside the features and their gradients. Measured 11.2, 12.1 and 6.3
    units; with both maps' graphs held through the products' gradient, 14.2, 18.2 and 8.2."""
    from efficient_attn_tasks.bench.saved import peak_bytes

    torch.manual_seed(0)
    attn = ea.create_attention(name, head_dim=D, num_heads=H, chunk_size=D, **options).train()
    length = 1024
    q, k, v = (torch.randn(B, H, length, D, requires_grad=True) for _ in range(3))
    out = attn(q, k, v, causal=True)
    grad = torch.randn(out.shape)
    peak = peak_bytes(lambda: torch.autograd.grad(out, (q, k, v), grad))
    assert peak <= bound * B * H * length * D * 4, peak / (B * H * length * D * 4)


def test_saved_bench_holds_the_batch_fixed(capsys):
    """``bench.saved --train-batch B``: B sequences at every L (tokens B·L grow with L), not tokens / L."""
    from efficient_attn_tasks.bench.saved import batch_size, lm_breakdown, main

    assert batch_size(64, 256) == 4 and batch_size(64, 256, 1) == 1 and batch_size(512, 256) == 1
    tiny = {"d_model": 32, "heads": 2, "d_ff": 64}
    one, two = (sum(r.nbytes for r in lm_breakdown("softmax", 64, 256, 1, batch=b, **tiny)) for b in (1, 2))
    fixed_tokens = sum(r.nbytes for r in lm_breakdown("softmax", 64, 256, 1, **tiny))  # batch 4
    assert one < two < fixed_tokens
    main(["--attentions", "softmax", "--lengths", "32", "64", "--train-batch", "1", "--layers", "1"])
    heads = [line for line in capsys.readouterr().out.splitlines() if line.startswith("softmax")]
    assert [h.split()[1:3] for h in heads] == [["L=32", "B=1"], ["L=64", "B=1"]], heads


@pytest.mark.parametrize("causal", [True, False])
def test_sliding_window_recompute_keeps_at_most_what_softmax_keeps(causal):
    """``sliding_window`` with ``recompute`` keeps q, k, v (no score blocks) and gives the same output and gradients
    as without, bit for bit (the same blocked computation, run again in backward)."""
    rows = _saved("sliding_window", {"window": 32}, causal, recompute=True)
    assert sum(r.nbytes for r in rows) <= _softmax_saved(causal), [(r.node, r.shape, r.nbytes) for r in rows]
    plain = _saved("sliding_window", {"window": 32}, causal, recompute=False)  # autograd keeps the score blocks
    assert sum(r.nbytes for r in plain) > sum(r.nbytes for r in rows)
    results = []
    for recompute in (False, True):
        attn = ea.create_attention("sliding_window", head_dim=D, num_heads=H, window=32, recompute=recompute).train()
        torch.manual_seed(1)
        q, k, v = (torch.randn(B, H, 70, D, requires_grad=True) for _ in range(3))
        mask = torch.zeros(B, 70, dtype=torch.bool)
        mask[0, -9:] = True
        out = attn(q, k, v, causal=causal, key_padding_mask=None if causal else mask)
        results.append((out, torch.autograd.grad(out, (q, k, v), torch.randn(out.shape))))
    (out0, grads0), (out1, grads1) = results
    assert torch.equal(out1, out0) and all(torch.equal(a, b) for a, b in zip(grads1, grads0))


def test_taylor_never_makes_its_features_whole():
    """Taylor's 273 features (d' = 16) are made per chunk inside the products, forward and backward: the most bytes
    live during a forward and backward of the attention (inputs there before) stay within 9.5 (B, H, L, D) float32
    units at D = 64, L = 2048 (measured 7.8; softmax's SDPA 7.0), where one whole (L, 273) feature tensor is 4.3
    units (the generic path, which makes φ(q), φ(k) and their gradients whole, or keeps them: 23.7)."""
    from efficient_attn_tasks.bench.saved import peak_bytes

    torch.manual_seed(0)
    b, h, length, d = 1, 2, 2048, 64
    attn = ea.create_attention("taylor", head_dim=d, num_heads=h, feature_dim=16).train()
    q, k, v = (torch.randn(b, h, length, d, requires_grad=True) for _ in range(3))
    grad = torch.randn(b, h, length, d)
    peak = peak_bytes(lambda: attn(q, k, v, causal=True).backward(grad))
    assert peak <= 9.5 * b * h * length * d * 4, peak / (b * h * length * d * 4)


def test_recompute_is_active_only_when_asked_in_grad_mode_and_eager():
    from efficient_attn.ops.differentiable import recompute_active

    assert recompute_active(True) and not recompute_active(False)
    with torch.no_grad():
        assert not recompute_active(True)
