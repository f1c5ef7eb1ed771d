"""The FlexAttention baselines of ``efficient-attn-bench``: their masks give our sliding_window and softmax
(eager flex_attention: no compile), a torch without flex_attention gives ``n/a`` rows, the summary's forward
table, and (slow) the bench end to end with compiled FlexAttention, forward only on CPU."""

import csv
import sys

import pytest
import torch

import efficient_attn as ea
from efficient_attn_tasks.bench import flex as bench_flex
from efficient_attn_tasks.bench import kernels
from efficient_attn_tasks.bench.report import flex_table
from efficient_attn_tasks.commands import bench


def _flex():
    """(create_block_mask, flex_attention), or the test is skipped where torch has no FlexAttention."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        pytest.skip("torch.nn.attention.flex_attention is unavailable")
    return create_block_mask, flex_attention


@pytest.mark.filterwarnings("ignore:.*flex_attention.*:UserWarning")  # eager: the unfused reference path
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("length, window", [(37, 5), (16, 16), (9, 1)])
def test_flex_masks_give_our_sliding_window_and_softmax(length, window, causal):
    create_block_mask, flex_attention = _flex()
    q, k, v = (torch.randn(2, 3, length, 8) for _ in range(3))  # (B, H, L, D)
    ours = {window: ea.create_attention("sliding_window", head_dim=8, num_heads=3, window=window),
            None: ea.create_attention("softmax", head_dim=8, num_heads=3)}
    for w, attn in ours.items():
        mod = bench_flex.mask_mod(causal, w)
        block_mask = None if mod is None else create_block_mask(mod, None, None, length, length, device="cpu")
        got = flex_attention(q, k, v, block_mask=block_mask)
        torch.testing.assert_close(got, attn(q, k, v, causal=causal), rtol=1e-5, atol=1e-6)


def test_flex_window_is_the_bench_sliding_window_window():
    spec = {"attention": "flex_window", "head_dim": 64, "heads": 8, "device": "cpu", "L": 4096}
    assert bench_flex.window_of(spec) == ea.attention_options("sliding_window")["window"]


def test_without_flex_attention_the_baselines_are_not_applicable(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.nn.attention.flex_attention", None)  # its import fails
    cfg = {"lengths": [64, 128], "device": "cpu", "dtype": "fp32", "timeout": 60.0, "repeats": 1,
           "batch": 1, "heads": 8, "head_dim": 64, "num_features": 256}
    for name in bench_flex.FLEX_BASELINES:
        rows = list(kernels.run_series(name, "causal", cfg, None))  # n/a before any subprocess
        assert [r["status"] for r in rows] == ["n/a", "n/a"] and "torch >= 2.5" in rows[0]["message"]
    assert bench_flex.flex_unavailable("softmax", "causal") is None


def test_flex_baselines_are_kernel_modes_only():
    assert "kernel modes" in bench_flex.flex_unavailable("flex", "decode")
    assert bench_flex.forward_only("flex_window", "cpu") and not bench_flex.forward_only("flex_window", "cuda:0")
    assert not bench_flex.forward_only("sliding_window", "cpu")


def _row(name, mode, length, status="ok", forward_s=None):
    return {"attention": name, "mode": mode, "L": length, "status": status, "time_s": None, "forward_s": forward_s}


def test_summary_compares_forward_times_measured_in_the_same_run():
    rows = [_row("sliding_window", "causal", 4096, forward_s=0.05),
            _row("flex_window", "causal", 4096, "forward only", 0.04),
            _row("softmax", "causal", 4096, forward_s=0.3), _row("flex", "causal", 4096, "error"),
            _row("sdpa", "causal", 4096, forward_s=0.2)]
    lines = flex_table(rows, [4096])
    assert "| causal | 4096 | 50.0 | 40.0 | 1.25× | 300.0 | error | – | 200.0 |" in lines
    assert not any(line.startswith("| noncausal") for line in lines)  # no FlexAttention row in that mode
    assert flex_table([r for r in rows if r["attention"] not in bench_flex.FLEX_BASELINES], [4096]) == []


@pytest.mark.slow
def test_bench_times_compiled_flex_forward_only_on_cpu(tmp_path):
    """End to end, tiny: compiled flex and flex_window rows are ``forward only`` with a forward time on CPU,
    ours have both times, and the summary puts their forward times side by side."""
    _flex()
    bench.main(["--attentions", "softmax,sliding_window,flex,flex_window", "--modes", "causal,noncausal",
                "--lengths", "96", "--heads", "2", "--head-dim", "8", "--repeats", "1", "--threads", "1",
                "--matmul-size", "64", "--no-baselines", "--timeout", "300", "--out", str(tmp_path)])
    rows = {(r["attention"], r["mode"]): r for r in csv.DictReader(open(tmp_path / "bench_cpu.csv"))}
    for mode in ("causal", "noncausal"):
        for name in ("flex", "flex_window"):
            row = rows[name, mode]
            assert row["status"] == "forward only" and float(row["forward_s"]) > 0 and not row["time_s"], row
        for name in ("softmax", "sliding_window"):
            assert rows[name, mode]["status"] == "ok" and float(rows[name, mode]["forward_s"]) > 0
    summary = (tmp_path / "summary_cpu.md").read_text()
    assert "## Forward alone against compiled FlexAttention" in summary
    assert any(line.startswith("| causal | 96 |") and line.count("×") == 2 for line in summary.splitlines())


def test_bench_without_flex_attention_records_n_a_and_still_summarises(tmp_path, monkeypatch):
    """A torch without FlexAttention: the flex rows are ``n/a`` (no crash), ours are timed both ways."""
    monkeypatch.setitem(sys.modules, "torch.nn.attention.flex_attention", None)
    bench.main(["--attentions", "sliding_window,flex_window", "--modes", "causal", "--lengths", "16", "--heads", "2",
                "--head-dim", "8", "--repeats", "1", "--threads", "1", "--matmul-size", "64", "--no-baselines",
                "--out", str(tmp_path)])
    rows = {r["attention"]: r for r in csv.DictReader(open(tmp_path / "bench_cpu.csv"))}
    assert rows["flex_window"]["status"] == "n/a"
    assert rows["sliding_window"]["status"] == "ok" and float(rows["sliding_window"]["forward_s"]) > 0
    assert "| causal | 16 |" in (tmp_path / "summary_cpu.md").read_text()
