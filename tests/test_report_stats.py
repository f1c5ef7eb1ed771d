"""efficient-attn-report statistics for few, bounded, bimodal seeds: bounded bootstrap intervals, per-seed values,
success rates (Clopper–Pearson, exact McNemar), Holm over every paired test, grid-edge and still-improving marks.
Constructed run records whose right answers are known; no training."""

import csv
import json

import pytest
from scipy import stats

from efficient_attn_tasks.commands.report import main
from efficient_attn_tasks.report.stats import bounded_interval, holm, mcnemar_p, success_ci
from efficient_attn_tasks.report.summary import summary
from tests.test_report_sweep import table_rows

BIMODAL = {2: 0.98, 0: 0.99, 1: 0.13}  # seed: test/acc, written out of seed order


def write(root, attention, seed, acc, *, lr=1e-3, val=None, **top):
    """One run dir with its results.json; ``top``: extra top-level record keys (best_step, converged)."""
    run = root / f"{len(list(root.iterdir())) if root.exists() else 0:04d}"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "hydra.yaml").write_text(f"hydra:\n  runtime:\n    choices:\n      attention: {attention}\n")
    record = {
        "name": "mqar", "task": "mqar", "attention": attention, "seed": seed,
        "config": {"task": {"seq_len": 64}, "optim": {"lr": lr}, "seed": seed},
        "metrics": {"monitor": "val/acc", "val_best": acc if val is None else val, "val_last": {},
                    "test": {"test/acc": acc}},
        "num_parameters": 1000, "steps": 100, **top,
    }
    (run / "results.json").write_text(json.dumps(record))


def test_bimodal_cell_interval_stays_inside_zero_one_and_lists_seeds(tmp_path, capsys):
    for seed, acc in BIMODAL.items():
        write(tmp_path, "favor", seed, acc)
    t_half = stats.t.ppf(0.975, 2) * stats.tstd(list(BIMODAL.values())) / 3 ** 0.5
    assert 0.7 + t_half > 1 and 0.7 - t_half < 0  # the t interval leaves [0, 1] on this cell
    main([str(tmp_path), "--rows", "attention", "--metrics", "test/acc", "--ci", "--per-seed", "--out",
          str(tmp_path / "t")])
    out = capsys.readouterr().out
    row = table_rows(out)["favor"]
    assert row["test/acc"] == "0.7 [0.13, 0.99]"  # bootstrap percentile: inside [min, max] of the seeds
    assert row["test/acc by seed"] == "0.99/0.13/0.98"  # seeds 0, 1, 2
    assert "bootstrap percentile" in out
    _, rows = read_stats_by_attention(tmp_path / "t_stats.csv")
    lo, hi = float(rows["favor"]["test/acc_lo"]), float(rows["favor"]["test/acc_hi"])
    assert 0.0 <= lo <= 0.7 <= hi <= 1.0
    assert rows["favor"]["test/acc_values"] == "0.99/0.13/0.98" and rows["favor"]["seeds"] == "0/1/2"
    assert bounded_interval([0.99, 0.13, 0.98], (0.0, 1.0)) == (lo, hi)  # seeded: the same on every call
    assert bounded_interval([0.5, 0.5]) == (0.5, 0.5)


def test_explicit_bounds_clip_and_reject_values_outside(tmp_path, capsys):
    for seed, acc in enumerate([20.0, 30.0, 40.0]):
        write(tmp_path, "favor", seed, acc)
    main([str(tmp_path), "--rows", "attention", "--metrics", "test/acc", "--ci"])
    assert " ± " in table_rows(capsys.readouterr().out)["favor"]["test/acc"]  # acc in percent: t interval
    main([str(tmp_path), "--rows", "attention", "--metrics", "test/acc", "--ci", "--bounds", "test/acc=0,100"])
    assert table_rows(capsys.readouterr().out)["favor"]["test/acc"] == "30 [20, 40]"
    with pytest.raises(SystemExit, match="outside"):
        main([str(tmp_path), "--rows", "attention", "--metrics", "test/acc", "--ci", "--bounds", "test/acc=0,1"])
    assert bounded_interval([0.2, 0.9], (0.3, 0.8)) == (0.3, 0.8)


def test_success_rate_has_the_exact_clopper_pearson_interval(tmp_path, capsys):
    for seed, acc in BIMODAL.items():
        write(tmp_path, "favor", seed, acc)
    for seed in range(5):
        write(tmp_path, "linear", seed, 0.1 + seed / 100)
    assert success_ci(0, 5) == pytest.approx((0.0, 0.5218), abs=1e-4)  # 1 - 0.025 ** (1 / 5), by hand
    assert success_ci(2, 3) == pytest.approx((0.0943, 0.9916), abs=1e-4)  # from a binomial table
    main([str(tmp_path), "--rows", "attention", "--metrics", "test/acc", "--success", "test/acc>=0.9"])
    out = capsys.readouterr().out
    rows = table_rows(out)
    ci = stats.binomtest(2, 3).proportion_ci(method="exact")
    assert rows["favor"]["test/acc>=0.9 (95% CI)"] == f"2/3 [{ci.low:.3g}, {ci.high:.3g}]" == "2/3 [0.0943, 0.992]"
    assert rows["favor"]["test/acc if test/acc>=0.9"] == "0.985 ± 0.007071"
    assert rows["linear"]["test/acc>=0.9 (95% CI)"] == "0/5 [0, 0.522]"
    assert rows["linear"]["test/acc if test/acc>=0.9"] == "n/a"
    with pytest.raises(SystemExit, match="METRIC>=THRESHOLD"):
        main([str(tmp_path), "--rows", "attention", "--success", "test/acc>0.9"])


def test_holm_adjusts_every_paired_test_of_the_table(tmp_path, capsys):
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])  # by hand
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1, never decreasing
    assert mcnemar_p(5, 0) == pytest.approx(2 * 0.5 ** 5) and mcnemar_p(0, 0) == 1.0
    base = [0.1, 0.2, 0.3, 0.4, 0.5]
    for seed, acc in enumerate(base):
        write(tmp_path, "softmax", seed, acc)
        write(tmp_path, "favor", seed, acc + 0.5 + seed / 100)  # every seed succeeds where softmax fails
        write(tmp_path, "linear", seed, acc + (0.02, -0.01, 0.03, 0.0, 0.01)[seed])
    main([str(tmp_path), "--rows", "attention", "--metrics", "test/acc", "--success", "test/acc>=0.6",
          "--paired", "softmax"])
    out = capsys.readouterr().out
    rows = table_rows(out)
    p_favor = stats.ttest_rel([a + 0.5 + s / 100 for s, a in enumerate(base)], base).pvalue
    p_linear = stats.ttest_rel([a + d for a, d in zip(base, (0.02, -0.01, 0.03, 0.0, 0.01))], base).pvalue
    raw = [p_favor, 0.0625, p_linear, 1.0]  # favor t, favor McNemar (5 vs 0), linear t, linear McNemar (0 vs 0)
    adjusted = holm(raw)
    assert adjusted[1] == pytest.approx(min(1.0, 3 * 0.0625))  # second smallest of 4 tests: times 3
    assert rows["favor"]["test/acc Holm p"] == f"{adjusted[0]:.3g}"
    assert rows["favor"]["test/acc>=0.6 Holm p"] == f"{adjusted[1]:.3g}"
    assert rows["favor"]["test/acc>=0.6 vs softmax (McNemar p)"] == "5/0 of 5 (0.0625)"  # no star: Holm 0.19
    assert rows["linear"]["test/acc Holm p"] == f"{adjusted[2]:.3g}"
    assert rows["linear"]["test/acc>=0.6 vs softmax (McNemar p)"] == "0/0 of 5 (1)"
    assert rows["favor"]["Δ test/acc vs softmax (paired p)"].endswith(" *") == (adjusted[0] < 0.05)
    assert rows["linear"]["Δ test/acc vs softmax (paired p)"] == f"+0.01 ({p_linear:.3g})"  # raw p, not adjusted
    assert "Holm correction over all 4 tests of the table (2 exact McNemar, 2 paired t)" in out


def test_paired_baseline_by_other_keys_or_one_row_for_all(tmp_path, capsys):
    """--paired KEY=VALUE: the baseline differs from a row in the named keys (converted vs scratch of the same
    attention); naming every --rows key pairs every row with one baseline row."""
    base = [0.1, 0.2, 0.3]
    for seed, acc in enumerate(base):
        write(tmp_path, "softmax", seed, acc + 0.4 + seed / 50, name="trained")
        write(tmp_path, "softmax", seed, acc, name="scratch")
        write(tmp_path, "taylor", seed, acc, name="trained")  # no scratch row: no baseline
        for attention, gain in (("favor", 0.1), ("linear", 0.2)):
            write(tmp_path, attention, seed, acc, name="scratch")
            write(tmp_path, attention, seed, acc + gain + seed / 100, name="convert")
    main([str(tmp_path), "--rows", "name,attention", "--metrics", "test/acc", "--paired", "name=scratch"])
    rows = table_rows(capsys.readouterr().out)
    p_favor = stats.ttest_rel([a + 0.1 + s / 100 for s, a in enumerate(base)], base).pvalue
    assert rows["convert / favor"]["Δ test/acc vs name=scratch (paired p)"].startswith(f"+0.11 ({p_favor:.3g})")
    assert rows["scratch / linear"]["Δ test/acc vs name=scratch (paired p)"] == "—"
    assert rows["trained / taylor"]["Δ test/acc vs name=scratch (paired p)"] == "no baseline"
    assert rows["trained / softmax"]["Δ test/acc vs name=scratch (paired p)"].startswith("+0.42 (")
    main([str(tmp_path), "--rows", "name,attention", "--metrics", "test/acc", "--paired",
          "name=trained,attention=softmax"])
    rows = table_rows(capsys.readouterr().out)
    column = "Δ test/acc vs name=trained,attention=softmax (paired p)"
    assert rows["scratch / favor"][column].startswith("-0.42 (") and rows["trained / softmax"][column] == "—"
    assert rows["scratch / softmax"][column].startswith("-0.42 (")
    assert rows["convert / linear"][column].startswith("-0.21 (")
    with pytest.raises(SystemExit, match=r"no row has those values; values of those keys: \{'name'"):
        main([str(tmp_path), "--rows", "name,attention", "--paired", "name=none"])
    for bad in ("seed=0", "name=", "name=scratch,softmax"):
        with pytest.raises(SystemExit):
            main([str(tmp_path), "--rows", "name,attention", "--paired", bad])
    assert "not in --rows" in capsys.readouterr().err


def test_grid_edge_marks_a_best_value_at_either_end(tmp_path, capsys):
    for seed in (0, 1):
        for lr, val in ((1e-4, 0.2), (1e-3, 0.9), (1e-2, 0.5)):  # the middle value wins
            write(tmp_path, "softmax", seed, 0.5, lr=lr, val=val)
        for lr, val in ((1e-4, 0.2), (1e-3, 0.5), (1e-2, 0.9)):  # the largest value wins
            write(tmp_path, "favor", seed, 0.5, lr=lr, val=val)
        for lr, val in ((1e-4, 1.0), (1e-3, 1.0), (1e-2, 0.3)):  # a tie at 1.0 goes to the smallest: the ceiling
            write(tmp_path, "linear", seed, 1.0, lr=lr, val=val)
        for lr, val in ((1e-4, 0.9999), (1e-3, 0.9998), (1e-2, 0.3)):  # just below the ceiling: a plain edge
            write(tmp_path, "taylor", seed, 1.0, lr=lr, val=val)
    main([str(tmp_path), "--rows", "attention", "--metrics", "test/acc", "--tune", "config.optim.lr", "--out",
          str(tmp_path / "t")])
    out = capsys.readouterr().out
    rows = table_rows(out)
    assert rows["softmax"]["best optim.lr"] == "0.001" and rows["favor"]["best optim.lr"] == "0.01 (edge)"
    assert rows["linear"]["best optim.lr"] == "0.0001 (edge, at ceiling)"
    assert rows["taylor"]["best optim.lr"] == "0.0001 (edge)"
    assert "(edge): the chosen value is the smallest or largest tried" in out
    assert "(edge, at ceiling): the chosen value is the smallest or largest tried, but its mean validation" in out
    _, stats_rows = read_stats_by_attention(tmp_path / "t_stats.csv")
    assert [stats_rows[a]["config.optim.lr edge"] for a in ("softmax", "favor", "linear", "taylor")] == \
        ["False", "True", "True", "True"]
    assert [stats_rows[a]["config.optim.lr at ceiling"] for a in ("softmax", "favor", "linear", "taylor")] == \
        ["False", "False", "True", "False"]


def test_no_ceiling_for_an_unbounded_monitor(tmp_path, capsys):
    """A loss monitor has no best possible value the report knows: an edge there is always a plain edge."""
    for seed in (0, 1):
        for lr, val in ((1e-4, 0.0), (1e-3, 0.5)):
            write(tmp_path, "softmax", seed, 0.5, lr=lr, val=val)
    for d in tmp_path.iterdir():
        record = json.loads((d / "results.json").read_text())
        record["metrics"]["monitor"] = "val/loss"
        (d / "results.json").write_text(json.dumps(record))
    main([str(tmp_path), "--rows", "attention", "--metrics", "test/acc", "--tune", "config.optim.lr"])
    assert table_rows(capsys.readouterr().out)["softmax"]["best optim.lr"] == "0.0001 (edge)"


def test_still_improving_counts_unconverged_runs(tmp_path, capsys):
    write(tmp_path, "softmax", 0, 0.9, converged=False, best_step=50)  # converged False wins over best_step
    write(tmp_path, "softmax", 1, 0.9, converged=True, best_step=100)
    write(tmp_path, "softmax", 2, 0.9, best_step=100)  # no converged: best checkpoint at the last step (steps 100)
    write(tmp_path, "softmax", 3, 0.9, converged=False, best_step=50)
    write(tmp_path, "favor", 0, 0.9, best_step=40)
    write(tmp_path, "favor", 1, 0.9)  # says neither
    write(tmp_path, "linear", 0, 0.9)
    main([str(tmp_path), "--rows", "attention", "--metrics", "test/acc", "--out", str(tmp_path / "t")])
    out = capsys.readouterr().out
    rows = table_rows(out)
    assert rows["softmax"]["still improving"] == "3/4"
    assert rows["favor"]["still improving"] == "0/1 (1 n/a)"
    assert rows["linear"]["still improving"] == "n/a"
    _, stats_rows = read_stats_by_attention(tmp_path / "t_stats.csv")
    assert stats_rows["softmax"]["still_improving"] == "3" and stats_rows["linear"]["still_improving"] == ""


def test_still_improving_column_is_absent_without_the_fields(tmp_path, capsys):
    write(tmp_path, "softmax", 0, 0.9)
    main([str(tmp_path), "--rows", "attention", "--metrics", "test/acc"])
    assert "still improving" not in capsys.readouterr().out


def read_stats_by_attention(path):
    """(header, {attention: row}) of a <out>_stats.csv grouped by attention."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, {r["attention"]: r for r in reader}


def test_multirun_summary_gives_an_accuracy_its_bounded_interval(tmp_path):
    for seed, acc in BIMODAL.items():
        write(tmp_path, "favor", seed, acc)
    text = summary(tmp_path)
    assert "| favor | 3 | 0.7 [0.13, 0.99] |" in text and "bootstrap interval inside [0, 1]" in text
