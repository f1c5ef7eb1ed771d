"""Approximation-error curves: the estimates use the registry's favor, shrink with m, count NaNs."""

import csv
import math

import pytest
import torch

from efficient_attn import create_attention
from efficient_attn.analysis.approx import (
    ESTIMATORS,
    Estimator,
    error_grid,
    error_vs_features,
    error_vs_scale,
    estimated_weights,
    exact_log_probs,
    kl_divergence,
    sample_inputs,
    sample_qkv,
    uniform_baseline,
)
from efficient_attn_tasks.approx import report as approx_report
from efficient_attn_tasks.commands import approx
from efficient_attn_tasks.run.fit import run
from tests.helpers import tiny_cfg

POSITIVE_ORTH, POSITIVE_IID = ESTIMATORS[0], ESTIMATORS[1]
BY_LABEL = {e.label: e for e in ESTIMATORS}
ELU = BY_LABEL["linear elu+1 (other kernel)"]
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
    for name in ("grid", "error_vs_features", "error_vs_scale"):
        assert (tmp_path / f"{name}.png").stat().st_size > 0
        header = (tmp_path / f"{name}.csv").read_text().splitlines()[0]
        assert header == ("estimator,num_features,scale,input_std,logit_std_measured,samples,mse_mean,mse_std,"
                          "non_finite,kl_mean,kl_std,kl_non_finite,uniform_mse_mean,uniform_mse_std,"
                          "uniform_kl_mean,uniform_kl_std,entropy_mean,entropy_std,entropy_max")
    grid = list(csv.DictReader(open(tmp_path / "grid.csv")))
    assert {(float(r["scale"]), int(r["num_features"])) for r in grid} == {(s, m) for s in (0.5, 1.0) for m in (16, 64)}
    assert all(r["samples"] == "3" for r in grid)  # --quick sets L, samples, m and scales
    summary = (tmp_path / "summary.md").read_text()
    assert "efficient-attn-approx --quick --length 64 --draws 2" in summary
    assert all(f"({c}) " in summary for c in "abcd")


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


# ----------------------------------------------------------------------------- the grid: fresh inputs, baselines
def test_each_sample_draws_a_fresh_input_and_fresh_features(monkeypatch):
    """Sample s: its own q, k, v (seed * 1000 + s) and its own features (seed s); the logits have the asked std."""
    import efficient_attn.analysis.approx as approx_mod

    seen, seeds = [], []
    real_inputs, real_create = approx_mod.sample_inputs, approx_mod.create_attention
    monkeypatch.setattr(approx_mod, "sample_inputs", lambda *a: seen.append(real_inputs(*a)) or seen[-1])
    monkeypatch.setattr(approx_mod, "create_attention",
                        lambda name, **kw: seeds.append(kw.get("seed")) or real_create(name, **kw))
    rows = error_grid([0.5], [8, 16], length=32, dim=8, samples=2, estimators=[POSITIVE_ORTH, ELU], kl_rows=8)
    assert len(seen) == 2
    for a, b in zip(seen[0], seen[1]):  # q, k, v of sample 0 and of sample 1
        assert not torch.equal(a, b)
    assert [s for s in seeds if s is not None] == [0, 0, 1, 1]  # softmax and elu+1 take no seed
    by = {(r["estimator"], r["num_features"]): r for r in rows}
    assert by[ELU.label, 8]["mse_mean"] == by[ELU.label, 16]["mse_mean"]  # one value per sample, any m
    assert by[ELU.label, 8]["mse_std"] > 0  # ... that differs between samples: the input is fresh
    assert all(r["samples"] == 2 and r["input_std"] == pytest.approx(0.5**0.5) for r in rows)
    q, k, _ = sample_inputs(2048, 16, 0.5, seed=3)
    assert float((q @ k.transpose(-1, -2)).std() / 4) == pytest.approx(0.5, rel=0.03)  # scale = std of q·k/√d


def test_uniform_baseline_against_its_formula_float64():
    """The uniform average's MSE and KL(P ‖ uniform) = log S − H(P), written out on a 3 × 4 case."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, n, 2, dtype=torch.float64) for n in (3, 4, 4))
    p = torch.softmax(q[0, 0] @ k[0, 0].T / 2**0.5, -1)  # (3, 4)
    exact = (p @ v[0, 0])[None, None]
    mean_v = v[0, 0].sum(0) / 4
    mse = sum(float((mean_v[c] - exact[0, 0, i, c]) ** 2) for i in range(3) for c in range(2)) / 6
    entropy = [-sum(float(p[i, j] * p[i, j].log()) for j in range(4)) for i in range(3)]
    kl = [sum(float(p[i, j] * (p[i, j] * 4).log()) for j in range(4)) for i in range(3)]
    log_p, visible = exact_log_probs(q, k)
    got = uniform_baseline(log_p, v, exact, visible)
    assert got["mse"] == pytest.approx(mse, rel=1e-12)
    assert got["entropy"] == pytest.approx(sum(entropy) / 3, rel=1e-12)
    assert got["entropy_max"] == pytest.approx(math.log(4), rel=1e-12)
    assert got["kl"] == pytest.approx(sum(kl) / 3, rel=1e-12)
    assert got["kl"] == pytest.approx(kl_divergence(log_p, torch.ones(1, 1, 3, 4, dtype=torch.float64)), rel=1e-12)
    # causal (3 queries, their first 3 keys): row i averages v_0..v_i and its maximum entropy is log(i + 1)
    q3, k3, v3 = q, k[..., :3, :], v[..., :3, :]
    log_p, visible = exact_log_probs(q3, k3, causal=True)
    exact = torch.softmax(log_p, -1) @ v3
    mean_v = torch.stack([v3[0, 0, : i + 1].mean(0) for i in range(3)])[None, None]
    got = uniform_baseline(log_p, v3, exact, visible)
    assert got["mse"] == pytest.approx(float((mean_v - exact).pow(2).mean()), rel=1e-12)
    assert got["entropy_max"] == pytest.approx((math.log(1) + math.log(2) + math.log(3)) / 3, rel=1e-12)
    assert got["kl"] == pytest.approx(kl_divergence(log_p, torch.ones(1, 1, 3, 3, dtype=torch.float64), visible),
                                      rel=1e-12)


def _row(est, scale, m, mse, kl, *, std=0.0, uniform=(1.0, 1.0), bad=0):
    return {"estimator": est, "num_features": m, "scale": scale, "input_std": scale**0.5, "logit_std_measured": scale,
            "samples": 4, "mse_mean": mse, "mse_std": std, "non_finite": 0, "kl_mean": math.nan if bad else kl,
            "kl_std": std, "kl_non_finite": bad, "uniform_mse_mean": uniform[0], "uniform_mse_std": 0.0,
            "uniform_kl_mean": uniform[1], "uniform_kl_std": 0.0, "entropy_mean": 2.0, "entropy_std": 0.0,
            "entropy_max": 3.0}


def test_summary_claim_checks_on_constructed_numbers():
    P, D, T = approx_report.POSITIVE, approx_report.IID, approx_report.TRIG
    rows = [  # scale 0.5: every claim holds; scale 1: positive loses to trig at m = 16, to iid at m = 64, ...
        _row(P, 0.5, 16, 0.4, 0.4), _row(P, 0.5, 64, 0.2, 0.2),
        _row(D, 0.5, 16, 0.5, 0.5), _row(D, 0.5, 64, 0.3, 0.3),
        _row(T, 0.5, 16, 0.9, 0, bad=2), _row(T, 0.5, 64, 0.8, 0, bad=4),
        _row(P, 1.0, 16, 2.0, 0.6, std=0.1), _row(P, 1.0, 64, 3.0, 0.5, std=0.1),
        _row(D, 1.0, 16, 2.5, 0.7, std=0.1), _row(D, 1.0, 64, 2.9, 0.7, std=0.1),
        _row(T, 1.0, 16, 1.0, 0.6, std=0.1), _row(T, 1.0, 64, 9.0, 0.9, std=0.1),  # a tie is no win
    ]
    for r in rows:
        if r["scale"] == 1.0:
            r["uniform_mse_mean"], r["uniform_kl_mean"] = 2.5, 0.55
    checks = {(c["scale"], c["claim"], c["metric"]): c for c in approx_report.claim_checks(rows)}
    assert all(c["holds_at"] == c["tested"] for (s, _, _), c in checks.items() if s == 0.5)
    assert checks[0.5, "c", "mse"]["tested"] == [64]  # steps: each m against the one before
    want = {("a", "mse"): [64], ("a", "kl"): [64], ("b", "mse"): [16], ("b", "kl"): [16, 64],
            ("c", "mse"): [], ("c", "kl"): [64], ("d", "mse"): [16], ("d", "kl"): [64]}
    assert {key: checks[(1.0, *key)]["holds_at"] for key in want} == want
    assert checks[1.0, "b", "mse"]["clear"] == [16]  # 2.5 − 2.0 > 2 s.e. = 2·√(2·0.01/4) ≈ 0.14; 3.0 − 2.9 is not
    assert approx_report.verdict(checks[0.5, "a", "kl"]) == "holds (2/2 m, 2 clear)"  # ∞ KL: a weight ≤ 0
    assert approx_report.verdict(checks[1.0, "c", "mse"]) == "reversed (0/1 steps, 1 clear)"
    assert approx_report.verdict(checks[1.0, "a", "mse"]) == "mixed: holds at m = 64 (1/2 m, 2 clear)"
    text = approx_report.summary(rows, "constructed")
    assert "| 1 | MSE | mixed: holds at m = 64 (1/2 m, 2 clear) | 2.00e+00 ± 1.0e-01 vs 1.00e+00 ± 1.0e-01 |" in text
    assert "∞ (4/4 samples)" in text and "| 0.5 | 0.500 | 2.000 ± 0.0e+00 | 3.000 |" in text
    without_trig = approx_report.claim_checks([r for r in rows if r["estimator"] != T])
    assert {c["claim"] for c in without_trig} == {"b", "c", "d"}
