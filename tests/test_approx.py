"""Approximation-error curves: the estimates use the registry's favor, shrink with m, count NaNs."""

import csv
import math

import pytest

from efficient_attn.analysis.approx import ESTIMATORS, Estimator, error_vs_features, error_vs_scale
from efficient_attn.analysis.approx_report import main
from tasks import approx
from tasks.train import run
from tests.test_train import tiny

POSITIVE_ORTH, POSITIVE_IID = ESTIMATORS[0], ESTIMATORS[1]
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
    """Trig keys carry h(k) = exp(‖k‖²/2) as a log-scale, so large norms no longer overflow; the
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


def test_cli_writes_csv_and_png(tmp_path):
    main(["--quick", "--length", "64", "--draws", "2", "--out", str(tmp_path)])
    for name in ("error_vs_features", "error_vs_scale"):
        assert (tmp_path / f"{name}.png").stat().st_size > 0
        header = (tmp_path / f"{name}.csv").read_text().splitlines()[0]
        assert header == "estimator,num_features,scale,draws,mse_mean,mse_std,non_finite"


@pytest.mark.parametrize("est", ESTIMATORS, ids=lambda e: e.label)
def test_every_estimator_is_a_registered_attention(est):
    rows = error_vs_features([8], length=16, dim=4, draws=1, scale=0.5, estimators=[est])
    assert rows[0]["draws"] == 1 and math.isfinite(rows[0]["mse_mean"])


def test_checkpoint_errors_per_site_and_depth(tmp_path):
    run(tiny("listops", "softmax", "trainer.max_epochs=1", "test=false"), tmp_path / "run")
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
