"""Hedgehog: the softmax feature map and its identity init, the reference with learned (random)
parameters, decoding, and the distillation loss: its value, its gradients, when it exists, that
training on it mimics softmax, and that the training app adds and logs it."""

import copy

import pytest
import torch

import efficient_attn as ea

from .helpers import assert_reset_random_is_seeded, assert_same_grads, decode_sequence, make_qkv, tiny_cfg
from .test_reference import kernel_hedgehog, reference


def build(d=8, h=2, dtype=torch.float64, random_params=True, **kwargs):
    """A float64 module in eval mode; ``random_params`` replaces the identity W and zero b (which
    would hide a skipped projection or bias) by random ones."""
    torch.manual_seed(1)
    attn = ea.create_attention("hedgehog", head_dim=d, num_heads=h, **kwargs).to(dtype).eval()
    if random_params:
        with torch.no_grad():
            for weight, bias in attn.maps():
                weight.normal_(0.0, d**-0.5)
                bias.normal_(0.0, 1.0)
    return attn


def mask_of(b, s, pad):
    """(B, S) bool from {row: slice of padded positions}."""
    mask = torch.zeros(b, s, dtype=torch.bool)
    for row, where in pad.items():
        mask[row, where] = True
    return mask


# ----------------------------------------------------------------------------- feature map


@pytest.mark.parametrize("feature_dim", [None, 3, 12])
def test_features_are_two_softmaxes_of_the_affine_map(feature_dim):
    """φ(x) = [softmax(x W_h + b_h), softmax(−x W_h − b_h)], written entry by entry with exp (float64)."""
    attn = build(feature_dim=feature_dim)
    d_prime = 8 if feature_dim is None else feature_dim
    x = make_qkv(b=2, h=2, length=5, d=8, scale=2.0)[0]  # (B, H, N, D)
    phi, log_scale = attn.feature_map(x, is_query=True)
    assert log_scale is None and phi.shape == (2, 2, 5, 2 * d_prime)
    want = torch.empty_like(phi)
    for b in range(2):
        for h in range(2):
            for n in range(5):
                z = [sum(x[b, h, n, i] * attn.weight[h, i, m] for i in range(8)) + attn.bias[h, m]
                     for m in range(d_prime)]
                pos = torch.stack([torch.exp(zm) for zm in z])
                neg = torch.stack([torch.exp(-zm) for zm in z])
                want[b, h, n] = torch.cat([pos / pos.sum(), neg / neg.sum()])
    torch.testing.assert_close(phi, want, rtol=1e-12, atol=1e-14)
    assert not torch.equal(attn.feature_map(x, is_query=False)[0], phi)  # keys have a map of their own


def test_identity_init_when_feature_dim_is_head_dim():
    attn = build(d=6, h=3, random_params=False)
    assert attn.feature_dim == 6 and torch.equal(attn.weight, torch.eye(6, dtype=torch.float64).expand(3, 6, 6))
    assert torch.equal(attn.bias, torch.zeros(3, 6, dtype=torch.float64))
    assert torch.equal(attn.k_weight, attn.weight) and torch.equal(attn.k_bias, attn.bias)  # both maps start alike
    x = make_qkv(b=1, h=3, length=4, d=6)[0]
    phi, _ = attn.feature_map(x, is_query=True)
    torch.testing.assert_close(phi, torch.cat([x.softmax(-1), (-x).softmax(-1)], -1), rtol=1e-14, atol=0)
    explicit = ea.create_attention("hedgehog", head_dim=6, num_heads=3, feature_dim=6)
    assert torch.equal(explicit.weight, torch.eye(6).expand(3, 6, 6))
    state = torch.get_rng_state()
    explicit.reset_random(3)  # nothing random to draw: identity again, the global RNG untouched
    assert torch.equal(explicit.weight, torch.eye(6).expand(3, 6, 6)) and torch.equal(torch.get_rng_state(), state)


def test_other_feature_dims_start_gaussian_and_are_seeded_per_module():
    attn = ea.create_attention("hedgehog", head_dim=16, num_heads=4, feature_dim=32)
    assert attn.weight.shape == (4, 16, 32) and torch.equal(attn.bias, torch.zeros(4, 32))
    assert abs(attn.weight.std().item() - 16**-0.5) < 0.02 and abs(attn.weight.mean().item()) < 0.02
    assert attn.k_weight.shape == (4, 16, 32) and torch.equal(attn.k_bias, torch.zeros(4, 32))
    assert not torch.equal(attn.k_weight, attn.weight)  # two draws
    assert_reset_random_is_seeded(attn, lambda a: a.weight)
    assert_reset_random_is_seeded(attn, lambda a: a.k_weight)


@pytest.mark.parametrize("feature_dim", [None, 5])
def test_queries_and_keys_have_separate_maps_unless_tied(feature_dim):
    """The default (the paper's): φ_q (weight, bias) and φ_k (k_weight, k_bias), distinct parameters; moving
    φ_k changes key features and the output, never a query's features. tied=True: one map, the parameter
    count of a single map (H·D·d' + H·d'), the same features for queries and keys."""
    attn = build(feature_dim=feature_dim)
    d_prime = feature_dim or 8
    single = 2 * 8 * d_prime + 2 * d_prime
    names = dict(attn.named_parameters())
    assert set(names) == {"weight", "bias", "k_weight", "k_bias"}
    assert sum(p.numel() for p in names.values()) == 2 * single
    assert attn.k_weight is not attn.weight and attn.k_bias is not attn.bias
    q, k, v = make_qkv(b=2, h=2, length=7, d=8, dv=3)
    phi_q, phi_k = attn.feature_map(q, is_query=True)[0], attn.feature_map(k, is_query=False)[0]
    out = {causal: attn(q, k, v, causal=causal) for causal in (False, True)}
    with torch.no_grad():
        attn.k_weight.add_(0.3 * torch.randn_like(attn.k_weight))
    assert torch.equal(attn.feature_map(q, is_query=True)[0], phi_q)
    assert not torch.allclose(attn.feature_map(k, is_query=False)[0], phi_k)
    for causal in (False, True):
        assert not torch.allclose(attn(q, k, v, causal=causal), out[causal], rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(attn(q, k, v, causal=causal), reference("hedgehog", attn, q, k, v, None, causal),
                                   rtol=1e-10, atol=1e-11)

    tied = build(feature_dim=feature_dim, tied=True)
    assert tied.k_weight is None and tied.k_bias is None and len(tied.maps()) == 1
    assert sum(p.numel() for p in tied.parameters()) == single and {n for n, _ in tied.named_parameters()} == {
        "weight", "bias"}
    assert torch.equal(tied.feature_map(q, is_query=False)[0], tied.feature_map(q, is_query=True)[0])
    torch.testing.assert_close(tied(q, k, v), reference("hedgehog", tied, q, k, v), rtol=1e-10, atol=1e-11)
    tied.reset_random(3)  # seeding covers the one map
    assert tied.k_weight is None


def test_bad_options_raise():
    for bad in (0, -2, 2.0, True):
        with pytest.raises(ValueError, match="feature_dim"):
            ea.create_attention("hedgehog", head_dim=8, num_heads=2, feature_dim=bad)
    for bad in (-0.5, float("nan"), "1", True):
        with pytest.raises(ValueError, match="distill"):
            ea.create_attention("hedgehog", head_dim=8, num_heads=2, distill=bad)
    for bad in (1, "no", None):
        with pytest.raises(ValueError, match="tied"):
            ea.create_attention("hedgehog", head_dim=8, num_heads=2, tied=bad)
    assert ea.attention_options("hedgehog") == {"feature_dim": None, "distill": 0.0, "tied": False, "chunk_size": 64,
                                                "recompute": True}


# ----------------------------------------------------------------------------- attention


@pytest.mark.parametrize("causal", [False, True])
def test_matches_reference_with_learned_parameters(causal):
    attn = build(feature_dim=5, chunk_size=4)
    q, k, v = make_qkv(b=2, h=2, length=11, d=8, dv=5, scale=2.0)
    mask = mask_of(2, 11, {0: slice(8, None), 1: slice(0, 2)})
    for m in (None, mask):
        got = attn(q, k, v, key_padding_mask=m, causal=causal)
        torch.testing.assert_close(got, reference("hedgehog", attn, q, k, v, m, causal), rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("chunk", [4, 5])
def test_gradients_across_chunks_match_float64_reference(chunk):
    """L = 13 > chunk: gradients for q, k, v, W and b equal the plain float64 formula's."""
    attn = build(chunk_size=chunk)
    q, k, v = (t.requires_grad_() for t in make_qkv(b=2, h=2, length=13, d=8, dv=5))
    mask = mask_of(2, 13, {1: slice(0, 2)})
    assert_same_grads(
        lambda: attn(q, k, v, key_padding_mask=mask, causal=True),
        lambda: reference("hedgehog", attn, q, k, v, mask, causal=True),
        (q, k, v), [attn.weight, attn.bias, attn.k_weight, attn.k_bias],
    )


def test_decoding_state_is_constant_size_and_equals_the_causal_forward():
    attn = build(feature_dim=4, chunk_size=3)
    q, k, v = make_qkv(b=1, h=2, length=9, d=8, dv=3)
    state = None
    for t in range(9):
        _, state = attn.decode_step(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], state)
        assert set(state) == {"kv"} and state["kv"].shape == (1, 2, 2 * 4, 3 + 1)
    torch.testing.assert_close(decode_sequence(attn, q, k, v), attn(q, k, v, causal=True), rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- distillation


def hand_distill(attn, q, k, mask, causal, detach_teacher=True):
    """The paper's loss written out row by row (float64): mean over the (b, h, i) rows that see a
    key of −Σ_j p_ij log p̂_ij, p = softmax(q_i·k_j/√D) and p̂ = K_ij/Σ_j K_ij (K = φ(q_i)·φ(k_j))
    over the visible keys j only."""
    B, H, L, D = q.shape
    total, rows = 0.0, 0
    for b in range(B):
        for h in range(H):
            kernel = kernel_hedgehog(attn, q[b, h], k[b, h], h)  # (L, S)
            for i in range(L):
                seen = [j for j in range(k.shape[2])
                        if (mask is None or not mask[b, j]) and (not causal or j <= i)]
                if not seen:
                    continue
                logits = torch.stack([q[b, h, i] @ k[b, h, j] / D**0.5 for j in seen])
                p = torch.exp(logits) / torch.exp(logits).sum()
                if detach_teacher:
                    p = p.detach()
                kij = torch.stack([kernel[i, j] for j in seen])
                total = total - (p * torch.log(kij / kij.sum())).sum()
                rows += 1
    return total / rows


CASES = [  # (L, S, causal, padding): left padding under causal leaves rows 0-1 of batch 1 empty
    (6, 6, False, None), (6, 6, True, None), (6, 6, False, {0: slice(4, None), 1: slice(0, 2)}),
    (6, 6, True, {0: slice(4, None), 1: slice(0, 2)}), (4, 7, False, {1: slice(5, None)}),
]


@pytest.mark.parametrize("length, s, causal, pad", CASES)
def test_distill_loss_equals_the_cross_entropy_by_hand(length, s, causal, pad):
    attn = build(d=4, feature_dim=3, distill=0.5).train()
    q, k, v = make_qkv(b=2, h=2, length=length, s=s, d=4, dv=3, scale=1.5)
    mask = None if pad is None else mask_of(2, s, pad)
    k = k if mask is None else k.masked_fill(mask[:, None, :, None], 7.0)  # the forward zeroes padded keys
    attn(q, k, v, key_padding_mask=mask, causal=causal)
    assert attn.aux_loss.shape == () and attn.aux_loss.dtype == torch.float64
    torch.testing.assert_close(attn.aux_loss, 0.5 * hand_distill(attn, q, k, mask, causal), rtol=1e-12, atol=1e-14)


def test_every_row_empty_gives_zero_loss():
    attn = build(d=4, distill=1.0).train()
    q, k, v = make_qkv(b=2, h=2, length=5, d=4)
    attn(q, k, v, key_padding_mask=torch.ones(2, 5, dtype=torch.bool))
    assert attn.aux_loss.item() == 0.0


@pytest.mark.parametrize("causal", [False, True])
def test_distill_gradient_flows_through_the_student_only(causal):
    """∂loss/∂(q, k, W, b) equal the hand loss's with the teacher detached, and differ from the
    gradient with the teacher trained too (so the teacher path contributes nothing)."""
    attn = build(d=4, feature_dim=3, distill=1.0).train()
    q, k, v = make_qkv(b=2, h=2, length=6, d=4, dv=3, scale=1.5)
    mask = mask_of(2, 6, {0: slice(4, None), 1: slice(0, 1)})
    q, k = q.requires_grad_(), k.requires_grad_()
    leaves = (q, k, attn.weight, attn.bias, attn.k_weight, attn.k_bias)

    attn(q, k, v, key_padding_mask=mask, causal=causal)
    got = torch.autograd.grad(attn.aux_loss, leaves)
    want = torch.autograd.grad(hand_distill(attn, q, k, mask, causal), leaves)
    both = torch.autograd.grad(hand_distill(attn, q, k, mask, causal, detach_teacher=False), leaves)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-13)
    assert all(g.abs().max() > 1e-3 for g in got)  # the student's q, k and both maps' W and b are all trained
    assert not torch.allclose(got[0], both[0], rtol=1e-6, atol=1e-8)  # a live teacher would change ∂q


def test_no_distill_loss_in_eval_mode_without_a_weight_or_when_decoding():
    q, k, v = make_qkv(b=1, h=2, length=5, d=8)
    attn = build(distill=1.0)  # eval mode
    attn(q, k, v, causal=True)
    assert attn.aux_loss is None
    attn.train()
    attn(q, k, v, causal=True)
    assert attn.aux_loss is not None
    attn.eval()
    attn(q, k, v, causal=True)
    assert attn.aux_loss is None  # an earlier training forward's loss does not linger
    off = build(distill=0.0).train()
    off(q, k, v, causal=True)
    assert off.aux_loss is None
    attn.train()
    attn.decode_step(q[:, :, :1], k[:, :, :1], v[:, :, :1])
    attn.attend_memory(q, attn.cache_memory(k, v))
    assert attn.aux_loss is None


def test_attention_aux_loss_sums_every_module_and_clears_them():
    torch.manual_seed(0)
    model = ea.MultiHeadAttention(16, 2, "hedgehog", {"distill": 2.0})
    other = ea.MultiHeadAttention(16, 2, "hedgehog", {"distill": 1.0})
    plain = ea.MultiHeadAttention(16, 2, "softmax")
    both = torch.nn.ModuleList([model, other, plain]).train()
    x = torch.randn(2, 5, 16)
    for m in both:
        m(x, causal=True)
    losses = [model.attention.aux_loss, other.attention.aux_loss]
    total = ea.attention_aux_loss(both)
    torch.testing.assert_close(total, losses[0] + losses[1])
    assert model.attention.aux_loss is None and other.attention.aux_loss is None
    assert ea.attention_aux_loss(both) is None  # read once
    total.backward()
    assert model.q_proj.weight.grad is not None and model.attention.weight.grad.abs().max() > 0


def test_distill_loss_in_bf16_at_large_norms_is_float32_and_close_to_float64():
    attn = build(d=64, dtype=torch.float32, random_params=False, distill=1.0).to(torch.bfloat16).train()
    q, k = (torch.randn(2, 2, 64, 64).mul(4.0).bfloat16() for _ in range(2))
    v = torch.randn(2, 2, 64, 64).bfloat16()
    mask = mask_of(2, 64, {1: slice(50, None)})
    out = attn(q, k, v, key_padding_mask=mask, causal=True)
    assert out.dtype == torch.bfloat16 and attn.aux_loss.dtype == torch.float32 and attn.aux_loss.isfinite()
    exact = copy.deepcopy(attn).double()
    exact(q.double(), k.double(), v.double(), key_padding_mask=mask, causal=True)
    torch.testing.assert_close(attn.aux_loss.double(), exact.aux_loss, rtol=1e-4, atol=0)


def test_training_on_the_distill_loss_learns_to_mimic_softmax():
    """The paper's point: 100 Adam steps on the distillation loss alone (W, b of one module, fixed
    spiky q, k) cut the KL from the softmax weights (cross-entropy − the teacher's entropy) to under
    half of the identity init's. Measured: ×0.35 (seeds 0-2)."""
    torch.manual_seed(0)
    attn = ea.create_attention("hedgehog", head_dim=16, num_heads=2, distill=1.0).train()
    q, k, v = (torch.randn(4, 2, 32, 16) * 2.0 for _ in range(3))  # logits q·k/4 with std 2: spiky
    teacher = torch.softmax(q @ k.transpose(-1, -2) / 4.0 + torch.full((32, 32), float("-inf")).triu(1), -1)
    entropy = -(teacher * teacher.clamp_min(1e-30).log()).sum(-1).mean()  # the loss's floor
    optimizer = torch.optim.Adam(attn.parameters(), lr=1e-2)
    kl = []
    for _ in range(100):
        attn(q, k, v, causal=True)
        loss = ea.attention_aux_loss(attn)
        kl.append(loss.item() - entropy.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    attn(q, k, v, causal=True)
    kl.append(attn.aux_loss.item() - entropy.item())
    assert kl[0] > 0.1 and kl[-1] < 0.5 * kl[0], (kl[0], kl[-1])


@pytest.mark.usefixtures("one_thread")
def test_training_app_adds_and_logs_the_distill_loss(tmp_path):
    """``attention=hedgehog attention.kwargs.distill=1.0`` on tiny MQAR: every step logs a finite
    ``train/aux_loss``, and the optimised loss is ``train/loss`` + it."""
    import pytorch_lightning as pl

    from efficient_attn_tasks.run.fit import run

    class Record(pl.Callback):
        def __init__(self) -> None:
            self.rows = []

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            metrics = trainer.callback_metrics
            self.rows.append((float(outputs["loss"]), float(metrics["train/loss"]), float(metrics["train/aux_loss"])))

    record = Record()
    cfg = tiny_cfg("mqar", "hedgehog", "attention.kwargs.distill=1.0", "trainer.max_epochs=1", "test=false")
    assert cfg.attention.name == "hedgehog" and cfg.attention.kwargs.distill == 1.0
    run(cfg, tmp_path, callbacks=[record])
    assert len(record.rows) == 2  # 32 examples, batches of 16
    for total, task, aux in record.rows:
        assert torch.isfinite(torch.tensor(aux)) and aux > 0
        assert total == pytest.approx(task + aux, rel=1e-5)
