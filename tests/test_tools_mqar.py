"""tools/mqar_protocol (the learning-rate choice of the resumable MQAR queue) and tools/swap_in (its table),
on constructed records: no training."""

import argparse
import csv
import json

import pytest

from efficient_attn_tasks.report.cells import parse_bounds
from efficient_attn_tasks.run.record import Metrics, RunError, RunRecord
from tools.mqar_protocol import best_lr, extension, item_overrides, launches, next_rate, parse_item, progress, widens
from tools.swap_in import parse_swap, summary


def run(lr: float, seed: int, val: float | None) -> RunRecord:
    status = "ok" if val is not None else "failed"
    return RunRecord(seed=seed, status=status, config={"optim": {"lr": lr}},
                     metrics=Metrics(monitor="val/acc", val_best=val) if val is not None else None)


def test_items_name_the_attention_its_convolution_cell_and_width():
    assert parse_item("deltanet+conv4:L64_kv8:128") == ("deltanet", 4, "L64_kv8", 128)
    assert parse_item("softmax:L256_kv16:64") == ("softmax", 0, "L256_kv16", 64)
    assert item_overrides("deltanet", 4, "L64_kv8", 128) == [
        "attention=deltanet", "mqar_cell=L64_kv8", "model.d_model=128", "attention.layer.short_conv=4"]


def test_the_rate_is_chosen_on_the_search_seeds_and_a_diverged_run_scores_the_worst():
    runs = [run(1e-3, 0, 0.9), run(1e-3, 1, 0.9), run(1e-2, 0, 0.99), run(1e-2, 1, None),
            run(3e-3, 0, 0.95), run(3e-3, 1, 0.2), run(3e-3, 2, 1.0)]  # seed 2: a confirm run, not a search one
    assert best_lr(runs, [1e-3, 3e-3, 1e-2], [0, 1]) == 1e-3
    assert best_lr(runs, [1e-3, 3e-3, 1e-2], [2]) == 3e-3
    assert best_lr([], [1e-3], [0, 1]) is None


def test_a_diverged_run_is_not_launched_again_and_other_failures_are():
    diverged = RunRecord(seed=1, status="failed", config={"optim": {"lr": 1e-2}},
                         error=RunError("FloatingPointError", "non-finite loss or gradient at step 241"))
    crashed = RunRecord(seed=0, status="failed", config={"optim": {"lr": 1e-2}}, error=RunError("OSError", "disk"))
    grid = [1e-3, 3e-3, 1e-2]
    assert launches([run(1e-3, 0, 0.9), crashed], grid, [0, 1]) == [(grid, [0, 1])]
    assert launches([diverged, crashed, run(1e-2, 0, 0.5)], grid, [0, 1]) == [([1e-3, 3e-3], [0, 1]), ([1e-2], [0])]
    both = RunRecord(seed=0, status="failed", config={"optim": {"lr": 1e-2}}, error=diverged.error)
    assert launches([diverged, both], [1e-2], [0, 1]) == []


def test_status_names_the_first_unfinished_stage_of_an_item():
    args = argparse.Namespace(lrs=[1e-3, 1e-2], search_seeds=[0, 1], seeds=3, more_seeds=5, success=0.9, extend=0)
    blowup = RunRecord(seed=1, status="failed", config={"optim": {"lr": 1e-2}},
                       error=RunError("FloatingPointError", "non-finite loss or gradient at step 9"))
    crashed = RunRecord(seed=1, status="failed", config={"optim": {"lr": 1e-3}}, error=RunError("OSError", "disk"))
    search = [run(1e-3, 0, 0.95), run(1e-2, 0, 0.5), blowup]
    assert progress(search + [crashed], args) == "search 3/4"  # a crash is run again; a divergence is not
    search.append(run(1e-3, 1, 0.2))
    assert progress(search, args) == "confirm at lr 0.001 2/3"
    agree = search[:-1] + [run(1e-3, 1, 0.96), run(1e-3, 2, 0.99)]
    assert progress(agree, args) == "done at lr 0.001: 3/3 with val >= 0.9"
    disagree = search + [run(1e-3, 2, 0.99)]  # 2 of 3 succeed: widened to 5 seeds
    assert progress(disagree, args) == "widen at lr 0.001 3/5"
    assert progress(disagree + [run(1e-3, 3, 0.1), run(1e-3, 4, 0.9)], args) == "done at lr 0.001: 3/5 with val >= 0.9"


def test_rates_are_half_a_decade_apart_past_either_end():
    assert [next_rate(x, 1) for x in (1e-2, 3e-2, 1e-4, 3e-4)] == [3e-2, 1e-1, 3e-4, 1e-3]
    assert [next_rate(x, -1) for x in (1e-4, 3e-5, 1e-2, 3e-3)] == [3e-5, 1e-5, 3e-3, 1e-3]


def test_the_search_goes_past_an_end_that_holds_the_best_rate_below_the_ceiling():
    args = argparse.Namespace(lrs=[1e-4, 1e-3, 1e-2], search_seeds=[0, 1], extend=2)
    grid = [run(lr, s, v) for lr, v in ((1e-4, 0.2), (1e-3, 0.5)) for s in (0, 1)]
    top = grid + [run(1e-2, 0, 0.9), run(1e-2, 1, 0.8), run(1e-2, 2, 0.1)]  # seed 2 is not a search seed
    assert extension(top, args.lrs, args) == 3e-2
    assert extension(top + [run(3e-2, 0, 0.95), run(3e-2, 1, 0.95)], args.lrs + [3e-2], args) == 1e-1
    assert extension(top + [run(3e-2, 0, 0.1), run(3e-2, 1, None)], args.lrs + [3e-2], args) is None  # inside now
    assert extension(top, args.lrs + [3e-2, 1e-1], args) is None  # --extend spent
    perfect = grid + [run(1e-2, 0, 1.0), run(1e-2, 1, 1.0)]  # at ceiling: no rate outside can beat it
    assert extension(perfect, args.lrs, args) is None
    bottom = [run(1e-4, s, 0.9) for s in (0, 1)] + [run(lr, s, 0.3) for lr in (1e-3, 1e-2) for s in (0, 1)]
    assert extension(bottom, args.lrs, args) == 3e-5
    inside = [run(lr, s, v) for lr, v in ((1e-4, 0.2), (1e-3, 0.9), (1e-2, None)) for s in (0, 1)]
    assert extension(inside, args.lrs, args) is None
    tie = bottom + [run(3e-5, s, 0.9) for s in (0, 1)]  # an added rate ties the old end: the smaller wins
    assert best_lr(tie, args.lrs + [3e-5], [0, 1]) == 3e-5 and extension(tie, args.lrs + [3e-5], args) == 1e-5


def test_status_names_the_extension_in_flight_then_confirms_at_its_best_rate():
    args = argparse.Namespace(lrs=[1e-3, 1e-2], search_seeds=[0, 1], seeds=3, more_seeds=3, success=0.9, extend=2)
    search = [run(1e-3, s, 0.3) for s in (0, 1)] + [run(1e-2, s, 0.8) for s in (0, 1)]
    assert progress(search, args) == "extend to lr 0.03 0/2"
    search += [run(3e-2, 0, 0.95), run(3e-2, 1, 0.9)]
    assert progress(search, args) == "extend to lr 0.1 0/2"
    search += [run(1e-1, 0, 0.1), run(1e-1, 1, 0.1)]
    assert progress(search, args) == "confirm at lr 0.03 2/3"


def test_only_the_confirmed_seeds_decide_whether_an_item_widens():
    args = argparse.Namespace(seeds=3, more_seeds=5, success=0.9)
    agree = [run(1e-3, 0, 0.95), run(1e-3, 1, 0.99), run(1e-3, 2, 0.9)]  # 0.9 is a success
    assert not widens(agree, args)
    assert not widens(agree + [run(1e-3, 3, 0.1)], args)  # a seed past --seeds does not reopen the item
    assert widens(agree[:2] + [run(1e-3, 2, 0.89)], args)
    assert not widens(agree[:2] + [run(1e-3, 2, 0.89)], argparse.Namespace(seeds=3, more_seeds=3, success=0.9))


def test_swap_in_table_gives_each_attention_its_change_from_the_trained_model():
    assert parse_swap("favor_plus:num_features=256,redraw_interval=0") == (
        "favor_plus", ["num_features=256", "redraw_interval=0"])
    assert parse_swap("linear") == ("linear", [])
    rows = [{"run": r, "seed": s, "attention": a, "acc": x} for r, s, a, x in [
        ("a", 0, "as trained", 1.0), ("b", 1, "as trained", 0.9), ("a", 0, "linear", 0.2), ("b", 1, "linear", 0.4)]]
    lines = summary(rows, "acc")
    assert lines[2].startswith("| as trained | 2 | 0.95 [0.9, 1] | 1/0.9 | +0 |")
    row = lines[3].split(" | ")
    assert row[0] == "| linear" and row[3] == "0.2/0.4" and float(row[4].rstrip(" |")) == pytest.approx(-0.65)


def test_a_swap_in_interval_lies_in_the_metrics_own_range():
    rows = [{"run": r, "seed": s, "attention": "as trained", "bleu": x} for r, s, x in [("a", 0, 31.4), ("b", 1, 29.0)]]
    cell = summary(rows, "bleu", parse_bounds(["bleu=0,100"]))[2].split(" | ")[2]
    assert cell == "30.2 [29, 31.4]"
    assert summary(rows, "bleu")[2].split(" | ")[2] == "30.2 [29, 31.4]"  # unbounded: never clipped to [0, 1]
    with pytest.raises(SystemExit, match="outside"):
        summary(rows, "bleu", {"bleu": (0.0, 1.0)})


def test_compute_sums_every_run_of_a_row_failed_ones_and_resumed_attempts_included(tmp_path, capsys):
    from tools.run_compute import main as compute

    def write(name: str, **rec) -> None:
        (tmp_path / name / ".hydra").mkdir(parents=True)
        base = {"name": "mqar", "task": "mqar", "seed": 0, "status": "ok", "config": {"model": {"d_model": 64}}}
        (tmp_path / name / "results.json").write_text(json.dumps({**base, **rec}))

    write("a", attention="softmax", wall_time_s=3600.0, train_tokens=7200, train_tokens_per_s=2.0)  # 1 h of training
    write("b", attention="softmax", wall_time_s=60.0, train_tokens=1800, train_tokens_per_s=1.0,  # 0.5 h over two
          resumed_from="b/checkpoints/last.ckpt")                                       # attempts, 60 s in the last
    write("c", attention="softmax", status="failed", wall_time_s=720.0, steps=9,
          error={"type": "FloatingPointError", "message": "non-finite loss"})
    write("d", attention="softmax", status="interrupted", wall_time_s=999.0, steps=9,
          error={"type": "KeyboardInterrupt", "message": "interrupted"})  # resumed or re-run: not a run of its own
    write("e", attention="linear", wall_time_s=1800.0, train_tokens=900, train_tokens_per_s=1.0)
    compute([str(tmp_path), "--rows", "attention,config.model.d_model", "--out", str(tmp_path / "out")])
    rows = {r["row"]: r for r in csv.DictReader(open(tmp_path / "out.csv"))}
    assert rows["softmax / 64"] == {"row": "softmax / 64", "runs": "2", "failed": "1", "wall_h": "1.217",
                                    "train_h": "1.500", "resumed": "1"}
    assert rows["linear / 64"]["wall_h"] == "0.500" and rows["linear / 64"]["train_h"] == "0.250"
    assert rows["total"] == {"row": "total", "runs": "3", "failed": "1", "wall_h": "1.717", "train_h": "1.750",
                             "resumed": "1"}
    assert list(rows) == ["linear / 64", "softmax / 64", "total"]
    assert "| softmax / 64 | 2 | 1 | 1.22 | 1.50 | 1 |" in capsys.readouterr().out
