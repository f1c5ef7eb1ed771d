"""efficient-attn-report on sweeps: --tune (val, never test), --ci, --paired (by seed), state sizes, <out>_stats.csv,
--plot. Fake run dirs as training writes them (.hydra/hydra.yaml, .hydra/overrides.yaml, results.json); no training."""

import csv
import json
import math

import pytest
from scipy import stats

from efficient_attn_tasks.commands.report import main
from efficient_attn_tasks.report import lines as table_lines
from efficient_attn_tasks.report.stats import ci_halfwidth

T_975_2 = 4.302652729749462  # t distribution, 97.5% quantile, 2 degrees of freedom (from a t table: 4.303)
ROWS = "attention,config.task.seq_len"


def mqar_record(attention, seed, *, acc, val=None, lr=1e-3, seq_len=64, d_model=64, kv=4, monitor="val/acc",
                state_size=None):
    """A results.json of one MQAR run; ``val`` is metrics.val_best (default: equal to the test accuracy)."""
    val = acc if val is None else val
    test = {"test/acc": acc, "test/loss": 1.0 - acc}
    if state_size is not None:
        test["test/state_size"] = float(state_size)
    return {
        "name": "mqar", "task": "mqar", "attention": attention.split("_")[0], "seed": seed,
        "config": {"task": {"seq_len": seq_len, "num_kv_pairs": kv}, "model": {"d_model": d_model},
                   "optim": {"lr": lr}, "seed": seed},
        "metrics": {"monitor": monitor, "val_best": val, "val_last": {monitor: val}, "test": test,
                    "best_checkpoint": "x.ckpt"},
        "num_parameters": 1000, "steps": 100, "train_tokens_per_s": 5e4, "peak_memory_mib": 400.0, "wall_time_s": 60.0,
    }


def write_run(root, attention, seed, **kw):
    """One run dir; the attention config file picked (e.g. favor_m16) is in .hydra/hydra.yaml, as Hydra writes it."""
    run = root / f"{len(list(root.iterdir())) if root.exists() else 0:04d}"  # sorted = written order
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "hydra.yaml").write_text(f"hydra:\n  runtime:\n    choices:\n      attention: {attention}\n")
    (run / ".hydra" / "overrides.yaml").write_text(f"- attention={attention}\n- seed={seed}\n")
    (run / "results.json").write_text(json.dumps(mqar_record(attention, seed, **kw)))


def cells(line):
    return [c.strip() for c in line.strip().strip("|").split("|")]


def table_rows(out):
    """{row label: {column: cell}} of the printed Markdown table."""
    lines = [line for line in out.splitlines() if line.startswith("|")]
    header = cells(lines[0])
    return {cells(line)[0]: dict(zip(header, cells(line))) for line in lines[2:]}


def read_stats(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, {(r["attention"], r["config.task.seq_len"]): r for r in reader}


# ---------------------------------------------------------------- --tune


def lr_sweep(root):
    """softmax: lr 1e-3 is best on val (0.85 vs 0.7) but 1e-2 is best on test (0.99 vs 0.5); favor_m16 the other way."""
    for seed, (v3, v2) in enumerate([(0.9, 0.7), (0.8, 0.7)]):
        write_run(root, "softmax", seed, lr=1e-2, val=v2, acc=0.99)
        write_run(root, "softmax", seed, lr=1e-3, val=v3, acc=0.5)
        write_run(root, "favor_m16", seed, lr=1e-2, val=0.6, acc=0.25)
        write_run(root, "favor_m16", seed, lr=1e-3, val=0.4, acc=0.75)
    write_run(root, "favor_m16", 0, lr=1e-4, val=0.1, acc=1.0)  # a third lr, one seed


def test_tune_picks_the_lr_by_validation_never_by_test(tmp_path, capsys):
    lr_sweep(tmp_path)
    main([str(tmp_path), "--rows", ROWS, "--tune", "config.optim.lr", "--metrics", "test/acc"])
    out = capsys.readouterr().out
    rows = table_rows(out)
    assert list(rows["softmax / 64"])[:5] == ["attention / config.task.seq_len", "n", "best optim.lr", "optim.lr tried",
                                               "test/acc"]
    assert rows["softmax / 64"]["best optim.lr"] == "0.001 (edge)" and rows["softmax / 64"]["n"] == "2"  # of 2 values
    assert rows["softmax / 64"]["test/acc"] == "0.5 ± 0"  # test of the val-chosen runs only, not 0.99
    assert rows["favor_m16 / 64"]["best optim.lr"] == "0.01 (edge)" and rows["favor_m16 / 64"]["optim.lr tried"] == "3"
    assert rows["favor_m16 / 64"]["test/acc"] == "0.25 ± 0"
    assert "every metric is from its runs only" in out


def test_tune_minimises_a_loss_monitor_and_breaks_ties_to_the_smaller_value(tmp_path, capsys):
    for seed in (0, 1):
        write_run(tmp_path, "softmax", seed, lr=1e-2, val=0.5, acc=0.1, monitor="val/loss")
        write_run(tmp_path, "softmax", seed, lr=1e-3, val=0.3 + seed * 0.1, acc=0.2, monitor="val/loss")  # mean 0.35
        write_run(tmp_path, "softmax", seed, lr=3e-2, val=0.5, acc=0.3, monitor="val/loss", seq_len=128)  # a tie,
        write_run(tmp_path, "softmax", seed, lr=2e-2, val=0.5, acc=0.4, monitor="val/loss", seq_len=128)  # smaller wins
    main([str(tmp_path), "--rows", ROWS, "--tune", "config.optim.lr", "--metrics", "test/acc"])
    rows = table_rows(capsys.readouterr().out)
    assert rows["softmax / 64"]["best optim.lr"] == "0.001 (edge)" and rows["softmax / 64"]["test/acc"] == "0.2 ± 0"
    assert rows["softmax / 128"]["best optim.lr"] == "0.02 (edge)" and rows["softmax / 128"]["test/acc"] == "0.4 ± 0"
    assert list(rows) == ["softmax / 64", "softmax / 128"]  # numbers sort numerically


def test_tune_compares_values_on_the_seeds_every_value_has(tmp_path, capsys):
    """A search on seeds 0, 1 then three more seeds at its winner: the winner must not lose the row to a value
    with fewer seeds because its later seeds did worse (1e-2: 0.95 on seeds 0, 1, mean 0.44 over five)."""
    for seed in (0, 1):
        write_run(tmp_path, "softmax", seed, lr=1e-3, val=0.9, acc=0.9)
    for seed, val in enumerate([0.95, 0.95, 0.1, 0.1, 0.1]):
        write_run(tmp_path, "softmax", seed, lr=1e-2, val=val, acc=val)
    main([str(tmp_path), "--rows", ROWS, "--tune", "config.optim.lr", "--metrics", "test/acc"])
    row = table_rows(capsys.readouterr().out)["softmax / 64"]
    assert row["best optim.lr"] == "0.01 (edge)" and row["n"] == "5"  # every seed of the chosen value is reported


def test_tune_counts_a_diverged_run_as_the_worst_score_of_its_value(tmp_path, capsys):
    """lr 1e-2: seed 0 scores 0.99, seed 1 diverged (a failed record). Comparing on seed 0 alone would pick 1e-2;
    the failed run is a seed tried at 1e-2 that scored the worst, so 1e-3 (0.9, 0.9) is chosen."""
    for seed in (0, 1):
        write_run(tmp_path, "softmax", seed, lr=1e-3, val=0.9, acc=0.9)
    write_run(tmp_path, "softmax", 0, lr=1e-2, val=0.99, acc=0.99)
    write_run(tmp_path, "softmax", 1, lr=1e-2, val=0.99, acc=0.99)
    diverged = tmp_path / sorted(p.name for p in tmp_path.iterdir())[-1] / "results.json"
    record = json.loads(diverged.read_text())
    record.update(status="failed", metrics=None, steps=3,
                  error={"type": "FloatingPointError", "message": "non-finite loss", "traceback": ""})
    diverged.write_text(json.dumps(record))
    main([str(tmp_path), "--rows", ROWS, "--tune", "config.optim.lr", "--metrics", "test/acc"])
    row = table_rows(capsys.readouterr().out)["softmax / 64"]
    assert row["best optim.lr"] == "0.001 (edge)" and row["n"] == "2"


def test_a_value_whose_every_run_diverged_was_tried_so_its_neighbour_is_not_at_the_edge(tmp_path, capsys):
    """1e-2 diverged on both seeds: 1e-3 is the largest finished value but not the largest tried."""
    for seed in (0, 1):
        write_run(tmp_path, "softmax", seed, lr=1e-4, val=0.5, acc=0.5)
        write_run(tmp_path, "softmax", seed, lr=1e-3, val=0.9, acc=0.9)
        write_run(tmp_path, "softmax", seed, lr=1e-2, val=0.99, acc=0.99)
    for run in sorted(tmp_path.iterdir()):
        record = json.loads((run / "results.json").read_text())
        if record["config"]["optim"]["lr"] == 1e-2:
            record.update(status="failed", metrics=None, steps=3,
                          error={"type": "FloatingPointError", "message": "non-finite loss", "traceback": ""})
            (run / "results.json").write_text(json.dumps(record))
    main([str(tmp_path), "--rows", ROWS, "--tune", "config.optim.lr", "--metrics", "test/acc"])
    row = table_rows(capsys.readouterr().out)["softmax / 64"]
    assert row["best optim.lr"] == "0.001" and row["n"] == "2"


def test_tune_key_among_rows_is_an_error(tmp_path):
    lr_sweep(tmp_path)
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--rows", "attention,config.optim.lr", "--tune", "config.optim.lr"])


# ---------------------------------------------------------------- --ci and state sizes


def test_ci_is_the_t_half_width_of_the_mean(tmp_path, capsys):
    assert ci_halfwidth([1.0, 2.0, 3.0]) == pytest.approx(T_975_2 * 1.0 / math.sqrt(3))  # s = 1
    assert ci_halfwidth([5.0]) == 0.0
    for seed, acc in enumerate([1.0, 2.0, 3.0]):
        write_run(tmp_path, "softmax", seed, acc=acc)
    write_run(tmp_path, "favor_m16", 0, acc=5.0)
    main([str(tmp_path), "--rows", "attention", "--metrics", "test/acc", "--ci"])
    out = capsys.readouterr().out
    rows = table_rows(out)
    assert rows["softmax"]["test/acc"] == f"2 ± {T_975_2 / math.sqrt(3):.4g}" == "2 ± 2.484"
    assert rows["favor_m16"]["n"] == "1" and rows["favor_m16"]["test/acc"] == "5"
    assert "95% confidence half-width" in out
    main([str(tmp_path), "--rows", "attention", "--metrics", "test/acc"])  # without --ci: ± std as before
    assert table_rows(capsys.readouterr().out)["softmax"]["test/acc"] == "2 ± 1"


def test_state_size_prints_as_an_integer_and_gets_no_delta(tmp_path, capsys):
    for seed in (0, 1):
        write_run(tmp_path, "softmax", seed, acc=0.5 + seed / 4, state_size=8192)
        write_run(tmp_path, "favor_m16", seed, acc=0.25 + seed / 4, state_size=96)
    for extra in ([], ["--ci"]):
        main([str(tmp_path), "--rows", "attention", "--metrics", "test/acc,test/state_size", "--paired", "softmax",
              *extra])
        rows = table_rows(capsys.readouterr().out)
        assert rows["softmax"]["test/state_size"] == "8,192" and rows["favor_m16"]["test/state_size"] == "96"
        assert [k for k in rows["softmax"] if k.startswith("Δ")] == ["Δ test/acc vs softmax (paired p)"]


# ---------------------------------------------------------------- --paired

SOFTMAX = [0.5, 0.625, 0.75, 0.875]  # exact in binary: differences below are exact too
FAVOR = [0.52, 0.64, 0.78, 0.89]  # +0.02, +0.015, +0.03, +0.015: a consistent offset, far below the seed spread


def paired_grid(root):
    for seed in (3, 1, 0, 2):  # dir order ≠ seed order: runs must be matched by seed, not by position
        write_run(root, "softmax", seed, acc=SOFTMAX[seed])
        write_run(root, "favor_m16", 3 - seed, acc=FAVOR[3 - seed])
        write_run(root, "exact", seed, acc=SOFTMAX[seed])
        write_run(root, "shifted", seed, acc=SOFTMAX[seed] + 0.125)
        write_run(root, "softmax", seed, acc=0.25 + seed / 8, seq_len=128)  # another cell, another baseline
        write_run(root, "favor_m16", seed, acc=0.25 + seed / 8 - (0.125 if seed % 2 else 0.0), seq_len=128)
    write_run(root, "favor_m16", 7, acc=0.0)  # a seed softmax lacks: left out of the pairs
    write_run(root, "linear", 2, acc=0.5)  # one matched seed


def test_paired_delta_and_p_match_ttest_rel_where_welch_sees_noise(tmp_path, capsys):
    paired_grid(tmp_path)
    main([str(tmp_path), "--rows", ROWS, "--metrics", "test/acc", "--paired", "softmax"])
    rows = table_rows(capsys.readouterr().out)
    column = "Δ test/acc vs softmax (paired p)"
    p = stats.ttest_rel(FAVOR, SOFTMAX).pvalue
    assert p < 0.05 < 0.5 < stats.ttest_ind(FAVOR, SOFTMAX, equal_var=False).pvalue  # paired: significant; Welch: noise
    delta = sum(f - s for f, s in zip(FAVOR, SOFTMAX)) / 4
    assert rows["favor_m16 / 64"][column] == f"{delta:+.4g} ({p:.3g}) *"
    low = [0.25 + s / 8 - (0.125 if s % 2 else 0.0) for s in range(4)]
    p128 = stats.ttest_rel(low, [0.25 + s / 8 for s in range(4)]).pvalue
    assert p128 > 0.05 and rows["favor_m16 / 128"][column] == f"-0.0625 ({p128:.3g})"  # no " *": noise
    assert rows["softmax / 64"][column] == "—" and rows["softmax / 128"][column] == "—"
    assert rows["linear / 64"][column] == "-0.25 (n<2)"  # seed 2 only: 0.5 - 0.75
    assert rows["exact / 64"][column] == "+0 (1)"  # every difference 0 (scipy: nan)
    assert rows["shifted / 64"][column] == "+0.125 (0) *"  # every difference the same non-zero number (scipy: nan)


def test_paired_with_ci_gives_the_interval_of_the_mean_difference(tmp_path, capsys):
    paired_grid(tmp_path)
    main([str(tmp_path), "--rows", ROWS, "--metrics", "test/acc", "--paired", "softmax", "--ci"])
    out = capsys.readouterr().out
    rows = table_rows(out)
    column = "Δ test/acc vs softmax (paired p)"
    result = stats.ttest_rel(FAVOR, SOFTMAX)
    lo, hi = result.confidence_interval()
    delta = sum(f - s for f, s in zip(FAVOR, SOFTMAX)) / 4
    assert rows["favor_m16 / 64"][column] == f"{delta:+.4g} [{lo:+.4g}, {hi:+.4g}] ({result.pvalue:.3g}) *"
    assert lo > 0  # the consistent offset: an interval above 0
    assert rows["linear / 64"][column] == "-0.25 (n<2)"  # one pair: no interval
    assert "[its 95% t-interval, raw]" in out


def test_paired_needs_attention_in_rows_excludes_baseline_and_needs_one_run_per_seed(tmp_path):
    paired_grid(tmp_path)
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--rows", ROWS, "--paired", "softmax", "--baseline", "softmax / 64"])
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--rows", "config.task.seq_len", "--paired", "softmax"])
    with pytest.raises(SystemExit, match="several runs with seed"):  # seq_len 64 and 128 in one row
        main([str(tmp_path), "--rows", "attention", "--paired", "softmax"])


# ---------------------------------------------------------------- <out>_stats.csv


def test_stats_csv_has_numeric_columns_per_row(tmp_path, capsys):
    runs = tmp_path / "runs"
    paired_grid(runs)
    for seed in range(4):  # a worse lr for softmax at 64 that --tune must drop
        write_run(runs, "softmax", seed, lr=1e-2, acc=0.9, val=0.1)
    out = tmp_path / "tables" / "mqar"
    main([str(runs), "--rows", ROWS, "--metrics", "test/acc", "--tune", "config.optim.lr", "--paired", "softmax",
          "--out", str(out)])
    header, rows = read_stats(tmp_path / "tables" / "mqar_stats.csv")
    assert (tmp_path / "tables" / "mqar.md").exists() and (tmp_path / "tables" / "mqar.csv").exists()
    assert header[:7] == ["attention", "config.task.seq_len", "n", "config.optim.lr", "config.optim.lr tried",
                          "test/acc_mean", "test/acc_ci"]
    assert "num_parameters_mean" in header
    assert header[-4:] == ["test/acc_delta", "test/acc_p", "test/acc_delta_lo", "test/acc_delta_hi"]
    favor = rows[("favor_m16", "64")]
    assert favor["n"] == "5" and float(favor["test/acc_mean"]) == pytest.approx(sum(FAVOR) / 5)
    assert float(favor["test/acc_delta"]) == pytest.approx(sum(f - s for f, s in zip(FAVOR, SOFTMAX)) / 4)
    assert float(favor["test/acc_p"]) == pytest.approx(stats.ttest_rel(FAVOR, SOFTMAX).pvalue)
    interval = stats.ttest_rel(FAVOR, SOFTMAX).confidence_interval()
    assert (float(favor["test/acc_delta_lo"]), float(favor["test/acc_delta_hi"])) == pytest.approx(tuple(interval))
    softmax = rows[("softmax", "64")]
    assert softmax["config.optim.lr"] == "0.001" and softmax["config.optim.lr tried"] == "2"
    assert float(softmax["test/acc_mean"]) == pytest.approx(sum(SOFTMAX) / 4)  # not the 0.9 of the dropped lr
    half = stats.t.ppf(0.975, 3) * stats.tstd(SOFTMAX) / math.sqrt(4)
    assert float(softmax["test/acc_ci"]) == pytest.approx(half)
    assert softmax["test/acc_delta"] == "" and softmax["test/acc_p"] == ""  # the baseline itself
    linear = rows[("linear", "64")]
    assert float(linear["test/acc_delta"]) == pytest.approx(0.5 - SOFTMAX[2]) and linear["test/acc_p"] == ""
    assert float(rows[("exact", "64")]["test/acc_p"]) == 1.0
    assert linear["n"] == "1" and float(linear["test/acc_ci"]) == 0.0


# ---------------------------------------------------------------- --plot


def grid(root):
    """attention × seq_len × d_model × lr × seed; kv pairs follow seq_len; the state size follows d_model."""
    for attention, base in (("softmax", 0.9), ("favor_m16", 0.6), ("linear", 0.4)):
        for seq_len, kv in ((64, 4), (128, 8), (256, 16)):
            for d_model in (32, 64):
                state = {"softmax": seq_len * d_model * 2, "favor_m16": 16 * d_model, "linear": d_model * d_model}
                for lr, shift in ((1e-3, 0.0), (1e-2, -0.2)):
                    for seed in (0, 1, 2):
                        acc = base - seq_len / 2560 + d_model / 640 + shift + seed / 100
                        write_run(root, attention, seed, lr=lr, seq_len=seq_len, kv=kv, d_model=d_model, acc=acc,
                                  state_size=state[attention])


SWEEP_ROWS = "attention,config.task.seq_len,config.task.num_kv_pairs,config.model.d_model"


def test_plot_gets_one_point_per_tuned_row(tmp_path, monkeypatch, capsys):
    grid(tmp_path / "runs")
    calls = []
    monkeypatch.setattr(table_lines, "plot", lambda points, out, **kw: calls.append((points, out, kw)))
    main([str(tmp_path / "runs"), "--rows", SWEEP_ROWS, "--tune", "config.optim.lr", "--plot", str(tmp_path / "a.png"),
          "--x", "config.task.seq_len", "--panel", "config.model.d_model", "--xlabel-key", "config.task.num_kv_pairs"])
    ((points, out, kw),) = calls
    assert kw == {"x": "config.task.seq_len", "y": "test/acc", "series": ["attention"],  # y: MQAR's headline
                  "panel": ["config.model.d_model"], "logx": False, "xlabel_key": "config.task.num_kv_pairs"}
    assert len(points) == 3 * 3 * 2 and {pt["config.optim.lr"] for pt in points} == {1e-3}  # tuned: best lr only
    pt = next(p for p in points if p["attention"] == "softmax" and p["config.task.seq_len"] == 64
              and p["config.model.d_model"] == 32)
    assert pt["n"] == 3 and pt["test/acc_mean"] == pytest.approx(0.9 - 0.025 + 0.05 + 0.01)
    assert pt["test/acc_ci"] == pytest.approx(T_975_2 * 0.01 / math.sqrt(3))


@pytest.mark.parametrize("options", [
    ["--x", "config.task.seq_len", "--panel", "config.model.d_model", "--logx", "--xlabel-key",
     "config.task.num_kv_pairs"],
    ["--x", "test/state_size", "--panel", "config.task.seq_len", "--logx"],
])
def test_plot_writes_a_png(tmp_path, capsys, options):
    grid(tmp_path / "runs")
    png = tmp_path / "plots" / "mqar.png"
    main([str(tmp_path / "runs"), "--rows", SWEEP_ROWS, "--tune", "config.optim.lr", "--ci", "--plot", str(png),
          *options])
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000


def test_plot_rejects_rows_it_cannot_tell_apart_and_options_without_plot(tmp_path, capsys):
    grid(tmp_path / "runs")
    with pytest.raises(SystemExit, match="several table rows"):  # d_model varies but is neither panel nor series
        main([str(tmp_path / "runs"), "--rows", SWEEP_ROWS, "--tune", "config.optim.lr",
              "--plot", str(tmp_path / "a.png"), "--x", "config.task.seq_len"])
    assert not (tmp_path / "a.png").exists()
    with pytest.raises(SystemExit):
        main([str(tmp_path / "runs"), "--rows", SWEEP_ROWS, "--x", "config.task.seq_len"])
