"""The 1/√d_k study (Vaswani et al. 2017, fn. 4): logit variance d_k vs 1, saturation, vanishing softmax gradient."""

import csv
import math

import pytest
import torch

from efficient_attn_tasks.approx import report as approx_report
from efficient_attn_tasks.approx.scaling import COLUMNS, softmax_jacobian_norm, sqrt_dk_study
from efficient_attn_tasks.commands import approx

DIMS = (16, 64, 256)


@pytest.fixture(scope="module")
def rows():
    """L = S = 64, 8 draws: about a second on one thread."""
    return {(r["d_k"], r["scaling"]): r for r in sqrt_dk_study(DIMS, queries=64, keys=64, draws=8)}


def test_logit_variance_is_dk_unscaled_and_one_scaled(rows):
    for d_k in DIMS:
        assert rows[d_k, "unscaled"]["logit_var_mean"] == pytest.approx(d_k, rel=0.1)
        assert rows[d_k, "scaled"]["logit_var_mean"] == pytest.approx(1.0, rel=0.1)


def test_unscaled_softmax_saturates_and_its_gradient_vanishes(rows):
    grad = [rows[d_k, "unscaled"]["grad_norm_mean"] for d_k in DIMS]
    assert grad[0] > grad[1] > grad[2], grad
    assert rows[256, "unscaled"]["grad_norm_mean"] < rows[256, "scaled"]["grad_norm_mean"]
    assert rows[256, "unscaled"]["grad_norm_median_mean"] < 0.2 * rows[256, "scaled"]["grad_norm_median_mean"]
    max_prob = [rows[d_k, "unscaled"]["max_prob_mean"] for d_k in DIMS]
    entropy = [rows[d_k, "unscaled"]["entropy_mean"] for d_k in DIMS]
    assert max_prob[0] < max_prob[1] < max_prob[2] and entropy[0] > entropy[1] > entropy[2]
    for d_k in DIMS:  # scaled: the same distribution whatever d_k
        assert rows[d_k, "scaled"]["max_prob_mean"] == pytest.approx(rows[16, "scaled"]["max_prob_mean"], rel=0.15)
        assert rows[d_k, "scaled"]["entropy_mean"] > entropy[0]


def test_jacobian_norm_closed_form_matches_autograd():
    z = torch.randn(5, 7, dtype=torch.float64) * 3
    p = z.softmax(-1)
    for i in range(5):
        jac = torch.autograd.functional.jacobian(lambda x: x.softmax(-1), z[i])  # (S, S)
        assert float(softmax_jacobian_norm(p[i])) == pytest.approx(float(jac.norm()), rel=1e-12)
    assert float(softmax_jacobian_norm(torch.tensor([1.0, 0.0, 0.0]))) == 0.0  # one-hot: no gradient
    assert float(softmax_jacobian_norm(torch.full((4,), 0.25))) == pytest.approx(math.sqrt(1 / 4 - 1 / 16))


def test_rows_have_the_documented_columns_and_draw_counts():
    rows = sqrt_dk_study((8,), queries=4, keys=6, draws=3)
    assert [(r["d_k"], r["scaling"]) for r in rows] == [(8, "unscaled"), (8, "scaled")]
    assert all(tuple(r) == COLUMNS and r["draws"] == 3 and r["keys"] == 6 for r in rows)
    with pytest.raises(ValueError, match="draws must be >= 2"):
        sqrt_dk_study((8,), draws=1)


def test_command_writes_csv_and_png(tmp_path):
    approx.main(["--study", "sqrt_dk", "--dims", "16", "64", "--length", "32", "--draws", "3", "--out", str(tmp_path)])
    table = list(csv.DictReader(open(tmp_path / "sqrt_dk.csv")))
    assert list(table[0]) == list(COLUMNS) == [
        "d_k", "scaling", "queries", "keys", "draws", "logit_var_mean", "logit_var_std", "max_prob_mean",
        "max_prob_std", "entropy_mean", "entropy_std", "grad_norm_mean", "grad_norm_std",
        "grad_norm_median_mean", "grad_norm_median_std"]
    assert [(r["d_k"], r["scaling"]) for r in table] == [("16", "unscaled"), ("16", "scaled"),
                                                          ("64", "unscaled"), ("64", "scaled")]
    assert (tmp_path / "sqrt_dk.png").stat().st_size > 0


def test_table_and_figure_go_to_the_active_wandb_run(tmp_path, monkeypatch):
    import wandb

    logged = []
    monkeypatch.setattr(wandb, "run", object())  # as if a run were active
    monkeypatch.setattr(wandb, "log", lambda data: logged.append(data))
    approx.main(["--study", "sqrt_dk", "--dims", "16", "--length", "8", "--draws", "2", "--out", str(tmp_path)])
    assert len(logged) == 1 and set(logged[0]) == {"approx/sqrt_dk", "approx/sqrt_dk_table"}
    assert isinstance(logged[0]["approx/sqrt_dk"], wandb.Image)
    assert logged[0]["approx/sqrt_dk_table"].columns == list(COLUMNS)


def test_favor_study_is_still_the_default(tmp_path, monkeypatch):
    called = []
    monkeypatch.setattr(approx_report, "run", lambda a: called.append(a))
    approx.main(["--quick", "--out", str(tmp_path)])
    assert called and called[0].study == "favor"
