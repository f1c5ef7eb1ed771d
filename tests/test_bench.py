"""The benchmark script end to end (tiny sizes), and its crossover logic."""

import csv
import re

import pytest

from efficient_attn_tasks.bench import report as bench_report
from efficient_attn_tasks.bench.report import crossover
from efficient_attn_tasks.commands import bench


@pytest.mark.slow
def test_bench_writes_csv_plot_and_summary(tmp_path, capsys):
    bench.main(["--attentions", "softmax,favor", "--modes", "causal,noncausal", "--lengths", "32", "64",
                "--heads", "2", "--head-dim", "16", "--num-features", "32", "--repeats", "1",
                "--matmul-size", "256", "--no-baselines", "--out", str(tmp_path)])
    rows = list(csv.DictReader(open(tmp_path / "bench_cpu.csv")))
    points = [r for r in rows if r["attention"] != "matmul"]
    assert {(r["attention"], r["mode"], r["L"]) for r in points} == {
        (a, m, L) for a in ("softmax", "favor") for m in ("causal", "noncausal") for L in ("32", "64")}
    assert all(r["status"] == "ok" and float(r["time_s"]) > 0 and float(r["peak_rss_mib"]) > 0 for r in points)
    assert all(r["num_features"] == "32" for r in points if r["attention"] == "favor")
    assert (tmp_path / "bench_cpu.png").stat().st_size > 10_000
    assert "matmul peak" in (tmp_path / "summary_cpu.md").read_text()
    err = capsys.readouterr().err
    wrote = re.findall(r"^wrote (.+)$", err, flags=re.M)
    assert wrote == [str(tmp_path / name) for name in ("bench_cpu.csv", "bench_cpu.png", "summary_cpu.md")]
    measured = re.findall(r"^  (\w+) +(\w+) +L=(\d+) ", err, flags=re.M)  # in the order they ran: one L at a time
    assert measured == [(a, m, L) for L in ("32", "64") for a in ("softmax", "favor") for m in ("causal", "noncausal")]
    assert [(r["attention"], r["mode"], r["L"]) for r in points] == [  # the CSV: grouped by series
        (a, m, L) for a in ("softmax", "favor") for m in ("causal", "noncausal") for L in ("32", "64")]


@pytest.mark.slow
def test_failed_point_skips_the_rest_of_its_series(tmp_path):
    bench.main(["--attentions", "softmax", "--modes", "noncausal", "--lengths", "32", "64",
                "--repeats", "1", "--matmul-size", "64", "--no-baselines", "--timeout", "0.01",
                "--out", str(tmp_path)])
    rows = [r for r in csv.DictReader(open(tmp_path / "bench_cpu.csv")) if r["attention"] == "softmax"]
    assert [r["status"] for r in rows] == ["timeout", "skipped"]


def test_unknown_attention_fails_before_running(tmp_path):
    with pytest.raises(ValueError, match="Registered attentions"):
        bench.main(["--attentions", "sofmax", "--out", str(tmp_path)])


def _row(name, mode, length, time_s, status="ok"):
    return {"attention": name, "mode": mode, "L": length, "time_s": time_s, "status": status}


def test_crossover():
    rows = [_row("favor", "noncausal", 256, 2.0), _row("sdpa", "noncausal", 256, 1.0),
            _row("favor", "noncausal", 512, 0.5), _row("sdpa", "noncausal", 512, 1.0),  # a lucky dip
            _row("favor", "noncausal", 1024, 3.0), _row("sdpa", "noncausal", 1024, 2.0),
            _row("favor", "noncausal", 2048, 3.0), _row("sdpa", "noncausal", 2048, 8.0),
            _row("favor", "noncausal", 4096, 6.0), _row("sdpa", "noncausal", 4096, None, "oom")]
    assert crossover(rows, "noncausal") == "L = 2048"
    assert crossover(rows[:6], "noncausal") == "not reached"
    renamed = [r | {"attention": {"favor": "linear", "sdpa": "softmax"}[r["attention"]], "mode": "train"} for r in rows]
    assert crossover(renamed, "train", name="linear", reference="softmax") == "L = 2048"
    assert crossover(renamed, "train") == "not reached"  # no favor or sdpa rows


@pytest.mark.slow
def test_decode_mode_and_causal_only_variants(tmp_path):
    """Decode points time real decoding states (a KV cache grows with L, a running sum does not);
    retention, causal-only, is n/a non-causally; cosformer gets a max_len covering the positions."""
    bench.main(["--attentions", "softmax,retention,cosformer", "--modes", "noncausal,decode", "--lengths", "32", "64",
                "--heads", "2", "--head-dim", "8", "--repeats", "1", "--decode-steps", "2", "--threads", "1",
                "--matmul-size", "64", "--no-baselines", "--out", str(tmp_path)])
    rows = {(r["attention"], r["mode"], r["L"]): r for r in csv.DictReader(open(tmp_path / "bench_cpu.csv"))}
    assert rows["retention", "noncausal", "32"]["status"] == "n/a"
    assert "causal-only" in rows["retention", "noncausal", "64"]["message"]
    for name in ("softmax", "retention", "cosformer"):
        for length in ("32", "64"):
            row = rows[name, "decode", length]
            assert row["status"] == "ok" and float(row["tokens_per_s"]) > 0, row
    state = lambda name, length: float(rows[name, "decode", length]["state_mib"])  # noqa: E731
    # softmax: 2 × B·H·(L + 3)·D float32 after the prefix, the warm-up and 2 timed steps
    assert state("softmax", "64") == pytest.approx(2 * 2 * 67 * 8 * 4 / 2**20)
    assert state("retention", "64") == state("retention", "32") == pytest.approx(2 * 8 * 8 * 4 / 2**20)
    summary = (tmp_path / "summary_cpu.md").read_text()
    assert "## Decoding" in summary and "| retention | noncausal | n/a |" in summary


def test_decode_only_summary_has_no_empty_kernel_tables(tmp_path):
    bench.main(["--attentions", "softmax", "--modes", "decode", "--lengths", "32", "--heads", "2", "--head-dim", "8",
                "--repeats", "1", "--decode-steps", "2", "--threads", "1", "--matmul-size", "64", "--no-baselines",
                "--out", str(tmp_path)])
    summary = (tmp_path / "summary_cpu.md").read_text()
    assert "## Decoding" in summary and "## Time (ms)" not in summary and "## Ratios" not in summary


def test_unknown_mode_is_an_error(tmp_path):
    with pytest.raises(SystemExit):
        bench.main(["--modes", "causal,decoding", "--out", str(tmp_path)])


def test_decode_crossover_against_softmax_and_sdpa():
    """The decode summary names, per attention, the prefix from which it is faster than softmax's
    cache and than sdpa's (here favor from 4096 against both; linear from 4096 against softmax, never against sdpa)."""
    times = {1024: (1, 2, 1.5, 3), 4096: (4, 2, 3, 3.5), 16384: (16, 2, 10, 12)}
    rows = [dict(attention=n, mode="decode", L=L, status="ok", time_s=t / 1000, state_mib=1.0)
            for L, ts in times.items() for n, t in zip(("softmax", "favor", "sdpa", "linear"), ts)]
    lines = bench_report.decode_table(rows, list(times), batch=8)
    assert "B = 8" in lines[1]
    assert "- favor: L = 4096 / L = 4096" in lines
    assert "- linear: L = 4096 / not reached" in lines


@pytest.mark.parametrize("name", ["gla", "mamba2", "deltanet", "gated_deltanet"])
def test_token_gated_attentions_are_causal_only_in_the_bench(name):
    """The token-gated attentions are n/a non-causally (no subprocess started) and run causally and decoding."""
    from efficient_attn_tasks.bench.points import not_applicable

    assert "causal-only" in not_applicable(name, "noncausal")
    assert not_applicable(name, "causal") is None and not_applicable(name, "decode") is None


def test_causal_only_variant_is_skipped_non_causally_not_crashed(tmp_path):
    """End to end at a tiny size: gla's non-causal points are n/a rows, its causal and decode points are
    measured, and the summary tables carry the n/a row beside softmax's."""
    bench.main(["--attentions", "softmax,gla", "--modes", "causal,noncausal,decode", "--lengths", "16",
                "--heads", "2", "--head-dim", "8", "--repeats", "1", "--decode-steps", "2", "--threads", "1",
                "--matmul-size", "64", "--no-baselines", "--out", str(tmp_path)])
    rows = {(r["attention"], r["mode"]): r for r in csv.DictReader(open(tmp_path / "bench_cpu.csv"))}
    assert rows["gla", "noncausal"]["status"] == "n/a" and "causal-only" in rows["gla", "noncausal"]["message"]
    assert not rows["gla", "noncausal"]["time_s"]
    for mode in ("causal", "decode"):
        assert rows["gla", mode]["status"] == rows["softmax", mode]["status"] == "ok", rows["gla", mode]
        assert float(rows["gla", mode]["time_s"]) > 0
    summary = (tmp_path / "summary_cpu.md").read_text()
    assert "| gla | noncausal | n/a |" in summary and "| gla | causal |" in summary
