"""Benchmark mode ``train`` (LM training throughput, attention share), the run budget, the ``sdpa_flash``
baseline and the GPU script's plan; no timing assertions (a fake clock checks what the share counts)."""

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from efficient_attn.attention.base import Attention
from efficient_attn.transformer import AttentionSpec, TransformerConfig, TransformerLM
from efficient_attn_tasks.bench import decode as bench_decode
from efficient_attn_tasks.bench import gpu as bench_gpu
from efficient_attn_tasks.bench import kernels
from efficient_attn_tasks.bench import train as bench_train
from efficient_attn_tasks.bench import train_report as bench_train_report
from efficient_attn_tasks.bench.sdpa import sdpa_unavailable
from efficient_attn_tasks.bench.train import PROFILE_STEPS, AttentionClock, run_train_point
from efficient_attn_tasks.commands import bench, gpu_bench

REPO = Path(__file__).resolve().parents[1]


class _FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _Tick(torch.autograd.Function):
    """Identity that advances a fake clock by ``fwd`` in forward and ``bwd`` in backward."""

    @staticmethod
    def forward(ctx, x, clock, fwd, bwd):
        clock.now += fwd
        ctx.clock, ctx.bwd = clock, bwd
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.clock.now += ctx.bwd
        return grad, None, None, None


@pytest.mark.parametrize("name", ["softmax", "favor"])
def test_attention_clock_counts_exactly_the_core_forward_and_backward(name):
    """Work inside each core attention advances a fake clock by 1 (forward) + 2 (backward); the
    projections around it, the feed-forwards and the output layer by other powers of ten. The clock
    must add up the core's share only: 3 per layer, forward and backward, nothing leaking in."""
    cfg = TransformerConfig(d_model=16, num_heads=2, d_ff=32, encoder_layers=0, decoder_layers=3, dropout=0.0)
    model = TransformerLM(cfg, 11, attention=AttentionSpec(name))
    clock = _FakeClock()

    def ticking(fwd, bwd):
        return lambda module, args, out: _Tick.apply(out, clock, fwd, bwd)

    cores = [m for m in model.modules() if isinstance(m, Attention)]
    for core in cores:
        attend = core.attend
        core.attend = lambda q, k, v, mask, causal, attend=attend: _Tick.apply(
            attend(q, k, v, mask, causal), clock, 1, 2)
    for layer in model.decoder.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            proj.register_forward_hook(ticking(10, 20))
        layer.self_attn.out_proj.register_forward_hook(ticking(100, 200))
        layer.ff.register_forward_hook(ticking(1000, 2000))
    model.output.register_forward_hook(ticking(10_000, 20_000))
    tokens = torch.randint(0, 11, (2, 9))
    with AttentionClock(model, sync=lambda: None, clock=clock) as timer:
        model(tokens).sum().backward()
    assert len(timer.cores) == 3
    assert timer.seconds == 3 * (1 + 2)
    timer.seconds = 0.0
    model(tokens).sum().backward()  # hooks removed on exit
    assert timer.seconds == 0.0


def _train_rows(out: Path) -> list[dict]:
    return list(csv.DictReader(open(out / "train_cpu.csv")))


@pytest.mark.slow
def test_quick_train_mode_writes_csv_plot_and_summary(tmp_path, capsys):
    bench.main(["--quick", "--modes", "train", "--attentions", "softmax,linear", "--lengths", "64", "128",
                "--threads", "1", "--no-baselines", "--out", str(tmp_path)])
    rows = _train_rows(tmp_path)
    assert [(r["attention"], r["L"], r["batch"]) for r in rows] == [
        ("softmax", "64", "16"), ("softmax", "128", "8"), ("linear", "64", "16"), ("linear", "128", "8")]
    for row in rows:
        assert row["status"] == "ok" and row["mode"] == "train", row
        assert 0 < float(row["attention_share"]) < 1, row
        assert float(row["tokens_per_s"]) > 0 and float(row["peak_rss_mib"]) > 0, row
        assert float(row["tokens_per_s"]) == pytest.approx(1024 / float(row["time_s"]))
        assert (row["d_model"], row["layers"], row["tokens_per_batch"], row["steps"]) == ("64", "2", "1024", "2")
    rechecked = [float(r["recheck_tokens_per_s"]) for r in rows if r["recheck_tokens_per_s"]]
    assert len(rechecked) == 2 and all(r > 0 for r in rechecked)  # softmax again after linear, at each L
    assert [r["recheck_tokens_per_s"] for r in rows[2:]] == ["", ""]
    assert not (tmp_path / "bench_cpu.csv").exists()  # no kernel mode asked, so no matmul or kernel files
    assert (tmp_path / "train_cpu.png").stat().st_size > 10_000
    text = (tmp_path / "train_summary_cpu.md").read_text()
    assert "| softmax | " in text and "(reference) |" in text
    assert re.search(r"^\| linear \| \d+ \| \d+ \| (L = \d+|not reached) \|$", text, flags=re.M), text
    assert len(re.findall(r"^\| (64|128) \| \d+ \| \d+ \| [+-]\d+\.\d% \|$", text, flags=re.M)) == 2, text
    err = capsys.readouterr().err
    order = re.findall(r"^  (\w+) +(train|re-check) +L=(\d+)", err, flags=re.M)
    assert order == [("softmax", "train", "64"), ("linear", "train", "64"), ("softmax", "re-check", "64"),
                     ("softmax", "train", "128"), ("linear", "train", "128"), ("softmax", "re-check", "128")]
    wrote = re.findall(r"^wrote (.+)$", err, flags=re.M)
    assert wrote == [str(tmp_path / n) for n in ("train_cpu.csv", "train_cpu.png", "train_summary_cpu.md")]
    assert {r["machine"] for r in rows} == {re.search(r"^- machine: (.+)$", text, flags=re.M)[1]}
    (tmp_path / "train_summary_cpu.md").unlink()
    bench.main(["--summarize", "--out", str(tmp_path)])  # from the CSV alone: the same summary
    assert (tmp_path / "train_summary_cpu.md").read_text() == text


def _point(name: str, length: int, tokens_per_s: float, recheck: float | None = None) -> dict:
    return {"attention": name, "mode": "train", "L": length, "batch": 1024 // length, "status": "ok",
            "time_s": 1024 / tokens_per_s, "tokens_per_s": tokens_per_s, "recheck_tokens_per_s": recheck,
            "attention_share": 0.5, "peak_rss_mib": 100.0, "peak_cuda_mib": None}


def test_summary_calls_a_difference_inside_the_reference_drift_noise():
    """softmax ran at 100 then 120 tokens/s at L = 64 (and 100, 101 at 128): 110 is between its two
    measurements (~, noise, not faster); 130 beats both; at 128 both beat 101."""
    rows = [_point("softmax", 64, 100.0, 120.0), _point("softmax", 128, 100.0, 101.0),
            _point("inside", 64, 110.0), _point("inside", 128, 150.0),
            _point("outside", 64, 130.0), _point("outside", 128, 150.0)]
    cfg = {"lengths": [64, 128], "device": "cpu", "warmup": 1, "steps": 2, "tokens_per_batch": 1024, "layers": 2,
           "d_model": 64, "train_heads": 4, "d_ff": 128, "dtype": "fp32"}
    text = bench_train_report.summary(rows, cfg, "test machine")
    assert "| inside | 110 | 150 | L = 128 |" in text and "| outside | 130 | 150 | L = 64 |" in text
    assert "| inside | ~1.10× | 1.50× |" in text and "| outside | 1.30× | 1.50× |" in text
    assert "| 64 | 100 | 120 | +20.0% |" in text and "Largest change: +20.0%." in text


def test_tokens_per_batch_must_be_a_multiple_of_every_length(capsys):
    with pytest.raises(SystemExit) as exit:  # parse only: a broken check must not start a full-size run
        bench.parse_args(["--modes", "train", "--lengths", "256", "32768"])
    assert exit.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("efficient-attn-bench: error: --tokens-per-batch 16384 is not a multiple of L = [32768]")
    assert "raise --tokens-per-batch" in err
    bench.parse_args(["--modes", "causal", "--lengths", "32768"])  # only the train mode needs it


def test_train_batch_fixes_the_batch_and_grows_the_tokens():
    """--train-batch B: batch B at every L (B·L tokens per step, no multiple-of-L check); --profile-steps 0."""
    args = bench.parse_args(["--modes", "train", "--train-batch", "2", "--lengths", "1000", "3000",
                             "--profile-steps", "0"])
    cfg = vars(args) | {"deadline": None}
    series = bench_train.Series("linear", cfg)
    specs = [series.spec(L) for L in (1000, 3000)]
    assert [(s["batch"], s["tokens_per_batch"]) for s in specs] == [(2, 2000), (2, 6000)]
    assert specs[0]["profile_steps"] == 0 and series.runs == args.warmup + args.steps
    assert bench.parse_args(["--modes", "train", "--lengths", "1024"]).train_batch is None


def test_spent_budget_skips_every_remaining_point(tmp_path):
    bench.main(["--attentions", "softmax", "--modes", "noncausal,train", "--lengths", "32", "64", "--budget", "0",
                "--no-baselines", "--out", str(tmp_path)])
    kernel = list(csv.DictReader(open(tmp_path / "bench_cpu.csv")))
    train = _train_rows(tmp_path)
    assert [r["status"] for r in kernel] == ["skipped"] * 3 and [r["status"] for r in train] == ["skipped"] * 2
    assert kernel[0]["attention"] == "matmul" and "--budget is spent" in kernel[1]["message"]
    assert "--budget is spent" in train[0]["message"] and train[1]["message"] == "after skipped at L=32"


def test_flash_baseline_is_not_applicable_in_fp32_on_cuda():
    assert sdpa_unavailable("sdpa_flash", "cuda", "fp32") == "FlashAttention on CUDA runs in fp16/bf16 only"
    assert sdpa_unavailable("sdpa_flash", "cuda:1", "bf16") is None
    assert sdpa_unavailable("sdpa_flash", "cpu", "fp32") is None
    assert sdpa_unavailable("sdpa", "cuda", "fp32") is None
    cfg = {"lengths": [1024, 4096], "device": "cuda", "dtype": "fp32", "timeout": 60.0, "repeats": 1,
           "batch": 1, "heads": 8, "head_dim": 64, "num_features": 256}
    rows = list(kernels.run_series("sdpa_flash", "noncausal", cfg, None))  # n/a before any subprocess or CUDA call
    assert [r["status"] for r in rows] == ["n/a", "n/a"]


def test_sdpa_flash_calls_sdpa_with_only_the_flash_backend_enabled(monkeypatch):
    import torch.nn.functional as F

    seen = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append((torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled(),
                     torch.backends.cuda.mem_efficient_sdp_enabled()))
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    q = torch.randn(1, 2, 8, 4)
    for name, expected in (("sdpa_flash", (True, False, False)), ("sdpa", (True, True, True))):
        seen.clear()
        kernels._build({"attention": name, "mode": "causal"})(q, q, q)
        cache = bench_decode.PreallocatedCache(q, q, 10, name)
        cache.decode_step(q[:, :, :1], q[:, :, :1], q[:, :, :1], None)
        assert seen == [expected, expected], name
    seen.clear()
    spec = {"attention": "sdpa_flash", "mode": "train", "L": 8, "batch": 2, "tokens_per_batch": 16, "d_model": 8,
            "layers": 2, "heads": 2, "d_ff": 8, "num_features": 4, "dtype": "fp32", "device": "cpu", "threads": 1,
            "steps": 1, "warmup": 0}
    assert run_train_point(spec)["status"] == "ok"
    assert seen == [(True, False, False)] * 2 * (1 + PROFILE_STEPS)  # 2 layers, every step


def test_sdpa_flash_runs_on_cpu_in_process():
    spec = {"attention": "sdpa_flash", "mode": "causal", "L": 16, "batch": 1, "heads": 2, "head_dim": 8,
            "num_features": 8, "dtype": "fp32", "device": "cpu", "threads": 1, "repeats": 1}
    assert kernels.run_point(spec)["status"] == "ok"
    assert bench_decode.run_decode(spec | {"mode": "decode", "decode_steps": 2})["status"] == "ok"


def test_gpu_plan_covers_both_dtypes_all_modes_and_every_run_parses():
    args = gpu_bench.parser().parse_args(["--device", "cuda"])
    runs = bench_gpu.plan(args, Path("/x/gpu_h200"))
    assert [(dtype, name) for dtype, name, _, _ in runs] == [
        ("bf16", "kernel"), ("bf16", "train"), ("fp32", "kernel"), ("fp32", "train")]
    for dtype, name, argv, _ in runs:
        parsed = bench.parse_args(argv)  # a plan the bench would reject fails here (e.g. tokens vs L)
        assert parsed.lengths == [1024, 4096, 16384, 65536] and parsed.dtype == dtype
        assert parsed.attentions == "softmax,favor,linear,sdpa,sdpa_flash" and parsed.device == "cuda"
        assert parsed.out == Path("/x/gpu_h200") / dtype
        assert parsed.modes == ("train" if name == "train" else "causal,noncausal,decode")
    assert bench.parse_args(runs[1][2]).tokens_per_batch == 65536
    assert sum(share for *_, share in runs) == pytest.approx(1.0)


REFUSED = [(["--device", "cpu"], "add --quick"),
           (["--device", "cpu", "--quick", "--attentions", "sofmax"], "'sofmax' is not")]


@pytest.mark.parametrize("argv, message", REFUSED)
def test_gpu_script_refuses_before_running(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit:
        gpu_bench.main([*argv, "--out", str(tmp_path)])
    assert exit.value.code == 2 and message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_gpu_script_quick_on_cpu(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    out = subprocess.run(["bash", str(REPO / "tools" / "gpu_bench.sh"), "--quick", "--device", "cpu",
                          "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    folder = tmp_path / "gpu_cpu"
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("gpu benchmark: 22 points (22 ok)") and last.endswith(f"files in {folder}/"), last
    for dtype in ("bf16", "fp32"):
        kernel = list(csv.DictReader(open(folder / dtype / "bench_cpu.csv")))
        assert {(r["attention"], r["mode"]) for r in kernel if r["attention"] != "matmul"} == {
            (a, m) for a in ("softmax", "sdpa", "sdpa_flash") for m in ("causal", "noncausal", "decode")}
        assert all(r["status"] == "ok" and r["dtype"] == dtype for r in kernel)
        train = _train_rows(folder / dtype)
        assert [r["attention"] for r in train] == ["softmax", "sdpa_flash"]
        assert all(r["status"] == "ok" and 0 < float(r["attention_share"]) < 1 for r in train)
    assert "| fp32 | train |" in (folder / "run.md").read_text()
