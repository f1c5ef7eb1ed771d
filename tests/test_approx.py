"""Approximation-error curves: the estimates use the registry's favor, shrink with m, count NaNs."""

import csv
import math

import pytest
import torch

from efficient_attn import create_attention
from efficient_attn.analysis.approx import (
    ESTIMATORS,
    Estimator,
    error_vs_features,
    error_vs_scale,
    estimated_weights,
    exact_log_probs,
    kl_divergence,
    sample_qkv,
)
from efficient_attn_tasks.commands import approx
from efficient_attn_tasks.run.fit import run
from tests.helpers import tiny_cfg

POSITIVE_ORTH, POSITIVE_IID = ESTIMATORS[0], ESTIMATORS[1]
BY_LABEL = {e.label: e for e in ESTIMATORS}
TRIG = Estimator("trig", "favor", {"kernel": "softmax_trig", "orthogonal": True})


def test_error_falls_towards_zero_as_features_grow():
    rows = error_vs_features([4, 64, 1024], length=128, dim=8, draws=6, scale=0.5, estimators=[POSITIVE_ORTH])
    errors = [r["mse_mean"] for r in rows]
    assert errors[0] > 4 * errors[1] > 16 * errors[2] > 0, errors
    assert all(r["draws"] == 6 and r["non_finite"] == 0 for r in rows)


def test_orthogonal_beats_iid_at_small_scale():
    kw = dict(length=128, dim=16, draws=12, scale=0.5)
    orth = error_vs_features([16], estimators=[POSITIVE_ORTH], **kw)[0]["mse_mean"]
    iid = error_vs_features([16], estimators=[POSITIVE_IID], **kw)[0]["mse_mean"]
    assert orth < iid


def test_trig_breaks_down_without_overflow_and_non_finite_is_counted_not_averaged(monkeypatch):
    """Trig keys carry h(k) = exp(‖k‖²/2) as a log-scale, so large norms do not overflow; the
    estimator still breaks down (signed normalizer), which the error shows. A non-finite estimate
    is counted apart and never averaged."""
    trig = error_vs_scale([3.0], num_features=8, length=32, dim=16, draws=3, estimators=[TRIG])[0]
    positive = error_vs_scale([3.0], num_features=8, length=32, dim=16, draws=3, estimators=[POSITIVE_ORTH])[0]
    assert trig["non_finite"] == 0 and positive["non_finite"] == 0
    assert trig["mse_mean"] > 100 * positive["mse_mean"], (trig, positive)
    import efficient_attn.analysis.approx as approx_mod

    real = approx_mod.create_attention

    def poisoned(name, **kw):
        attn = real(name, **kw)
        attn.register_forward_hook(lambda mod, args, out: out * float("nan") if kw.get("seed") == 1 else out)
        return attn

    monkeypatch.setattr(approx_mod, "create_attention", poisoned)
    row = error_vs_scale([0.5], num_features=8, length=32, dim=16, draws=3, estimators=[TRIG])[0]
    assert row["non_finite"] == 1 and row["draws"] == 3 and math.isfinite(row["mse_mean"])


def test_kl_divergence_against_its_formula():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 5, 4, dtype=torch.float64), torch.randn(1, 1, 7, 4, dtype=torch.float64)
    log_p, visible = exact_log_probs(q, k)
    assert visible is None
    p = torch.softmax(q @ k.transpose(-1, -2) / 2, -1)
    assert kl_divergence(log_p, p * 3.0) == pytest.approx(0.0, abs=1e-14)  # any row scale cancels
    w = torch.rand(1, 1, 5, 7, dtype=torch.float64) + 0.1
    p_hat = w / w.sum(-1, keepdim=True)
    want = (p * (p / p_hat).log()).sum(-1).mean()
    assert kl_divergence(log_p, w) == pytest.approx(float(want), rel=1e-12)
    bad = w.clone()
    bad[0, 0, 3, 2] = -0.01  # a signed weight (trig features): the estimate is no distribution
    assert kl_divergence(log_p, bad) == math.inf
    # causal: row i over keys 0..i only; weights of future keys are ignored, even signed ones
    log_p, visible = exact_log_probs(q, k, causal=True)
    w_future = w.clone()
    w_future[0, 0, 0, 5] = -1.0
    want = 0.0
    for i in range(5):
        pi = torch.softmax(q[0, 0, i] @ k[0, 0, : i + 1].T / 2, -1)
        pi_hat = w[0, 0, i, : i + 1] / w[0, 0, i, : i + 1].sum()
        want += float((pi * (pi / pi_hat).log()).sum()) / 5
    assert kl_divergence(log_p, w_future, visible) == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("label", ["positive / orthogonal", "positive / simplex", "hyperbolic / orthogonal",
                                   "trig / orthogonal", "relu / orthogonal (other kernel)",
                                   "linear elu+1 (other kernel)"])
def test_kl_judges_the_distribution_the_attention_uses(label):
    """Normalised ``estimated_weights`` times v is the module's own output (non-causal)."""
    est = BY_LABEL[label]
    q, k, v = sample_qkv(24, 8, 0.5, seed=1)
    kw = {**est.kwargs, "num_features": 12, "seed": 0} if est.name == "favor" else est.kwargs
    attn = create_attention(est.name, head_dim=8, num_heads=1, **kw).double()
    w = estimated_weights(attn, q, k)
    torch.testing.assert_close(w / w.sum(-1, keepdim=True) @ v, attn(q, k, v), rtol=1e-10, atol=1e-12)


def test_kl_falls_with_features_and_new_estimators_beat_positive_orthogonal_at_small_scale():
    """At scale 0.25 (d = 16, m = 64, 10 draws; measured MSE 2.2e-5 / 4.9e-6 / 1.4e-6 and KL 2.7e-3 /
    5.7e-4 / 1.7e-4): simplex projections beat orthogonal ones, hyperbolic features (2m of them from
    the same m projections) beat positive ones, by over 2× in both errors."""
    rows = error_vs_features([4, 64, 1024], length=128, dim=8, draws=4, scale=0.5, estimators=[POSITIVE_ORTH])
    kls = [r["kl_mean"] for r in rows]
    assert kls[0] > 4 * kls[1] > 16 * kls[2] > 0 and all(r["kl_non_finite"] == 0 for r in rows), kls
    labels = ("positive / orthogonal", "positive / simplex", "hyperbolic / orthogonal")
    orth, simplex, hyp = error_vs_features([64], length=256, dim=16, draws=10, scale=0.25,
                                           estimators=[BY_LABEL[x] for x in labels])
    for key in ("mse_mean", "kl_mean"):
        assert simplex[key] < orth[key] / 2 and hyp[key] < orth[key] / 2, (key, orth, simplex, hyp)


def test_trig_kl_is_counted_infinite_when_weights_go_negative():
    at_3 = error_vs_scale([3.0], num_features=8, length=32, dim=16, draws=3, estimators=[TRIG])[0]
    assert at_3["kl_non_finite"] == 3 and math.isnan(at_3["kl_mean"])
    small = error_vs_scale([0.1], num_features=64, length=32, dim=16, draws=3, estimators=[TRIG])[0]
    assert small["kl_non_finite"] == 0 and 0 < small["kl_mean"] < 1e-3, small


def test_cli_writes_csv_and_png(tmp_path):
    approx.main(["--quick", "--length", "64", "--draws", "2", "--out", str(tmp_path)])
    for name in ("error_vs_features", "error_vs_scale"):
        assert (tmp_path / f"{name}.png").stat().st_size > 0
        header = (tmp_path / f"{name}.csv").read_text().splitlines()[0]
        assert header == ("estimator,num_features,scale,draws,mse_mean,mse_std,non_finite,"
                          "kl_mean,kl_std,kl_non_finite")


@pytest.mark.parametrize("est", ESTIMATORS, ids=lambda e: e.label)
def test_every_estimator_is_a_registered_attention(est):
    rows = error_vs_features([8], length=16, dim=4, draws=1, scale=0.5, estimators=[est])
    assert rows[0]["draws"] == 1 and math.isfinite(rows[0]["mse_mean"])


def test_checkpoint_errors_per_site_and_depth(tmp_path):
    run(tiny_cfg("listops", "softmax", "trainer.max_epochs=1", "test=false"), tmp_path / "run")
    ckpt = next((tmp_path / "run" / "checkpoints").glob("best-*.ckpt"))
    approx.main(["--checkpoint", str(ckpt), "--draws", "2", "--layer-features", "8", "64", "--batch-size", "4",
                 "--out", str(tmp_path / "out")])
    sites = list(csv.DictReader(open(tmp_path / "out" / "error_by_site.csv")))
    depth = list(csv.DictReader(open(tmp_path / "out" / "error_by_depth.csv")))
    assert {r["site"] for r in sites} == {f"model.encoder.layers.{i}.self_attn.attention" for i in range(2)}
    assert [r["site"] for r in depth if r["estimator"] == "m=8"] == ["model.encoder.layers.0", "model.encoder.layers.1"]
    for rows in (sites, depth):  # more features, smaller error, at every layer
        by_m = {m: [float(r["mse_mean"]) for r in rows if r["estimator"] == m] for m in ("m=8", "m=64")}
        assert all(0 < b < a for a, b in zip(by_m["m=8"], by_m["m=64"])), by_m
    assert all(float(r["kl_mean"]) > 0 and r["kl_non_finite"] == "0" for r in sites)  # FAVOR+ rows against softmax
    own = list(csv.DictReader(open(tmp_path / "out" / "model_rows.csv")))  # a softmax model: its rows are softmax's
    assert [(r["site"], r["attention"], r["rows"]) for r in own] == [
        (f"model.encoder.layers.{i}.self_attn.attention", "softmax", "softmax") for i in range(2)]
    assert all(abs(float(r["kl_softmax_model"])) < 1e-12 and float(r["softmax_mass"]) == pytest.approx(1) for r in own)
    assert (tmp_path / "out" / "model_rows.md").read_text().startswith("| layer | site | attention | rows |")
