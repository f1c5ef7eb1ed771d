"""Learning curves: every run writes curves.csv and curves.png (train loss, the task's validation metric,
learning rate against steps), whatever its logger, complete after the test loaded an earlier checkpoint;
``efficient-attn-report --curves`` draws a sweep's validation curves as mean ± std over seeds per row."""

import csv
import json
import math

import numpy as np
import pytest
import pytorch_lightning as pl

from efficient_attn_tasks.commands.report import main as report
from efficient_attn_tasks.report.curve_bands import band, edges
from efficient_attn_tasks.run import curves as curves_module
from efficient_attn_tasks.run.callbacks import Throughput
from efficient_attn_tasks.run.curves import plot_run, read_curves, write_curves
from efficient_attn_tasks.run.fit import draw_curves, run
from tests.helpers import tiny_cfg

pytestmark = pytest.mark.usefixtures("one_thread")

PNG = b"\x89PNG\r\n\x1a\n"


class StepLog(pl.Callback):
    """What the module logged at every step, every validation's val/acc, the throughput when fit ended."""

    def __init__(self) -> None:
        self.loss, self.lr, self.val = {}, {}, {}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.loss[trainer.global_step] = float(trainer.callback_metrics["train/loss"])
        self.lr[trainer.global_step] = float(trainer.callback_metrics["train/lr"])

    def on_validation_end(self, trainer, module) -> None:
        if not trainer.sanity_checking:
            self.val[trainer.global_step] = float(trainer.callback_metrics["val/acc"])

    def on_train_end(self, trainer, module) -> None:
        self.tokens_per_s = next(c for c in trainer.callbacks if isinstance(c, Throughput)).tokens_per_s


def test_a_run_writes_its_curves_and_the_plot_shows_them(tmp_path):
    """8 steps (2 epochs of 4, validated after each), a row every 3 steps and at the last: train/loss is the mean
    of the steps since the previous row, train/lr the rate of that step. lr 1e-9 leaves val/acc unchanged, so the
    best checkpoint, which the test loads (and with it the callbacks' states), is step 4's: the curves and the
    throughput are still the whole run's."""
    log = StepLog()
    record = run(tiny_cfg("listops", "softmax", "trainer.max_epochs=2", "trainer.log_every_n_steps=3", "optim.lr=1e-9",
                      "optim.warmup_steps=4"), tmp_path, callbacks=[log])
    assert record.metrics.test_checkpoint["step"] == 4  # the case where test reloads an earlier state
    png = (tmp_path / "curves.png").read_bytes()
    assert png.startswith(PNG) and len(png) > 10_000
    drawn = plot_run(read_curves(tmp_path / "curves.csv"), "val/acc", tmp_path / "again.png")
    windows = {3: [1, 2, 3], 6: [4, 5, 6], 8: [7, 8]}
    assert drawn["train/loss"][0] == [3, 6, 8]
    assert drawn["train/loss"][1] == pytest.approx([np.mean([log.loss[s] for s in w]) for w in windows.values()],
                                                   rel=1e-6)  # float32 sums
    assert drawn["train/lr"] == ([3, 6, 8], [log.lr[3], log.lr[6], log.lr[8]])
    assert drawn["val/acc"] == ([4, 8], [log.val[4], log.val[8]])
    assert log.val[8] == record.metrics.val_last["val/acc"]
    assert record.train_tokens_per_s == log.tokens_per_s  # not the best checkpoint's count


def test_curves_round_trip_through_the_csv(tmp_path):
    rows = [(1, "train/loss", 2.5), (1, "train/lr", 1e-4), (4, "val/acc", 0.25), (4, "train/loss", float("nan")),
            (8, "val/acc", 1 / 3)]
    read = read_curves(write_curves(rows, tmp_path))
    assert list(read) == ["train/loss", "train/lr", "val/acc"]
    assert read["train/lr"] == ([1], [1e-4]) and read["val/acc"] == ([4, 8], [0.25, 1 / 3])
    assert read["train/loss"][0] == [1, 4] and math.isnan(read["train/loss"][1][1])


def test_a_failed_plot_is_a_warning_not_a_failed_run(tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("no fonts")

    monkeypatch.setattr(curves_module, "plot_run", broken)
    draw_curves([(1, "train/loss", 1.0)], tmp_path, "val/acc", "listops / softmax")
    assert "warning: learning curves not drawn (RuntimeError: no fonts)" in capsys.readouterr().err
    assert (tmp_path / "curves.csv").exists() and not (tmp_path / "curves.png").exists()


# ----------------------------------------------------------------------------- report --curves
STEPS = [10, 20, 30]
VAL = {  # attention config -> per seed the val/acc at STEPS (favor_relu seed 1 stopped early: no step 30)
    "softmax": [[0.20, 0.50, 0.70], [0.30, 0.60, 0.90]],
    "favor_relu": [[0.10, 0.25, 0.40], [0.15, 0.35]],
}


def fake_sweep(root, with_curves=True):
    """Run dirs as efficient-attn-train writes them: .hydra/hydra.yaml (the attention config picked),
    results.json and curves.csv (train rows too, which the sweep plot ignores)."""
    job = 0
    for attention, seeds in VAL.items():
        for seed, values in enumerate(seeds):
            run_dir = root / f"{job}_{attention}"
            (run_dir / ".hydra").mkdir(parents=True)
            (run_dir / ".hydra" / "hydra.yaml").write_text(
                f"hydra:\n  runtime:\n    choices:\n      attention: {attention}\n  job:\n    num: {job}\n")
            record = {"name": "mqar", "task": "mqar", "attention": attention.split("_")[0], "seed": seed,
                      "attention_config": attention, "config": {"seed": seed},
                      "metrics": {"monitor": "val/acc", "val_best": max(values), "val_last": {"val/acc": values[-1]},
                                  "test": {"test/acc": values[-1]}}}
            (run_dir / "results.json").write_text(json.dumps(record))
            if with_curves:
                rows = [(s, "val/acc", v) for s, v in zip(STEPS, values)] + [(s, "train/loss", 9.0) for s in STEPS]
                write_curves(rows, run_dir)
            job += 1


def test_report_curves_draws_mean_and_std_over_seeds_per_attention(tmp_path, capsys):
    fake_sweep(tmp_path / "sweep")
    report([str(tmp_path / "sweep"), "--rows", "attention", "--out", str(tmp_path / "table"), "--curves"])
    out = capsys.readouterr().out
    png, numbers = tmp_path / "table_curves.png", tmp_path / "table_curves.csv"
    assert f"wrote {png}" in out and f"wrote {numbers}" in out
    assert png.read_bytes().startswith(PNG)
    with open(numbers, newline="") as f:
        lines = list(csv.DictReader(f))
    for attention, seeds in VAL.items():
        mine = [line for line in lines if line["row"] == attention]
        assert [int(line["step"]) for line in mine] == STEPS and {line["metric"] for line in mine} == {"val/acc"}
        for i, line in enumerate(mine):
            at = np.array([values[i] for values in seeds if len(values) > i], dtype=np.float64)
            assert int(line["n"]) == len(at)
            assert float(line["mean"]) == pytest.approx(at.mean(), rel=1e-12, abs=1e-15)
            if len(at) > 1:
                assert float(line["std"]) == pytest.approx(at.std(ddof=1), rel=1e-12, abs=1e-15)
            else:
                assert line["std"] == ""  # one seed: no spread to shade


def test_band_is_over_the_seeds_that_reached_each_step():
    b = band("favor_relu", "val/acc", [([10, 20, 30], [0.1, 0.25, 0.4]), ([10, 20], [0.15, 0.35])])
    assert b.steps == STEPS and b.n == [2, 2, 1]
    assert b.mean == pytest.approx([0.125, 0.3, 0.4], rel=1e-12)
    assert b.std[:2] == pytest.approx([np.std([0.1, 0.15], ddof=1), np.std([0.25, 0.35], ddof=1)], rel=1e-12)
    assert math.isnan(b.std[2])
    lo, hi = edges(b, 0.0, 1.0)  # accuracies: clipped to [0, 1]; no band from a single seed
    assert lo[:2] == pytest.approx([0.125 - b.std[0], 0.3 - b.std[1]])
    assert hi[:2] == pytest.approx([0.125 + b.std[0], 0.3 + b.std[1]])
    assert math.isnan(lo[2]) and math.isnan(hi[2])


def test_report_curves_needs_a_file_or_out_and_counts_runs_without_curves(tmp_path, capsys):
    fake_sweep(tmp_path / "sweep")
    with pytest.raises(SystemExit, match="--curves: give a file"):
        report([str(tmp_path / "sweep"), "--rows", "attention", "--curves"])
    fake_sweep(tmp_path / "old", with_curves=False)
    report([str(tmp_path / "sweep"), str(tmp_path / "old"), "--rows", "attention", "--curves", str(tmp_path / "c.png")])
    assert "--curves: 4 run(s) without curves.csv left out" in capsys.readouterr().err
    assert (tmp_path / "c.png").exists() and (tmp_path / "c.csv").exists()
    with pytest.raises(SystemExit, match="--curves: no run has a curves.csv"):
        report([str(tmp_path / "old"), "--rows", "attention", "--curves", str(tmp_path / "d.png")])
