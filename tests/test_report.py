"""efficient-attn-report: run records in, exact tables out (mean ± std, n, Δ with Welch p, pivot, missing runs)."""

import json

from scipy import stats

from tasks.report import main


def record(attention: str, seed: int, score: float, task: str = "translation", metric: str = "test/bleu") -> dict:
    return {
        "name": "exp", "task": task, "attention": attention, "seed": seed,
        "metrics": {"monitor": "val/x", "val_best": score - 1, "test": {metric: score}},
        "num_parameters": 1000, "train_tokens_per_s": 2000.0, "peak_memory_mib": 500.0, "wall_time_s": 60.0,
    }


def write_run(root, name, rec=None):
    (root / name / ".hydra").mkdir(parents=True)
    if rec is not None:
        (root / name / "results.json").write_text(json.dumps(rec))


def runs(tmp_path):
    write_run(tmp_path, "0", record("softmax", 0, 30.0))
    write_run(tmp_path, "1", record("softmax", 1, 32.0))
    write_run(tmp_path, "2", record("favor", 0, 29.0))
    write_run(tmp_path, "3", record("favor", 1, 27.0))
    write_run(tmp_path, "4", record("linear", 0, 20.0))
    write_run(tmp_path, "5")  # crashed: no results.json


def test_table_groups_seeds_and_lists_missing_runs(tmp_path, capsys):
    runs(tmp_path)
    main([str(tmp_path), "--out", str(tmp_path / "table")])
    lines = (tmp_path / "table.md").read_text().splitlines()
    assert lines[0] == ("| name / task / attention | n | val val/x (best) | test/bleu | num_parameters "
                        "| train_tokens_per_s | peak_memory_mib | wall_time_s |")
    assert lines[2] == "| exp / translation / favor | 2 | 27 ± 1.414 | 28 ± 1.414 | 1,000 ± 0 | 2,000 ± 0 | 500 ± 0 | 60 ± 0 |"
    assert lines[3] == "| exp / translation / linear | 1 | 19 | 20 | 1,000 | 2,000 | 500 | 60 |"
    assert lines[5] == f"| {tmp_path / '5'} (missing results.json) | 0 | n/a | n/a | n/a | n/a | n/a | n/a |"
    assert (tmp_path / "table.csv").read_text().count("\n") == 5
    assert "softmax" in capsys.readouterr().out


def test_baseline_adds_delta_and_welch_p(tmp_path, capsys):
    runs(tmp_path)
    main([str(tmp_path), "--rows", "attention", "--baseline", "softmax"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("| Δ test/bleu (p) |")
    p = stats.ttest_ind([29.0, 27.0], [30.0, 32.0], equal_var=False).pvalue
    assert lines[2].endswith(f"| -3 ({p:.3g}) |")  # favor
    assert lines[3].endswith("| -11 (n<2) |")  # linear: one seed, no p-value
    assert lines[4].endswith("| +0 (1) |")  # softmax against itself


def test_pivot_by_task_with_average(tmp_path, capsys):
    write_run(tmp_path, "0", record("softmax", 0, 0.4, "listops", "test/acc"))
    write_run(tmp_path, "1", record("softmax", 1, 0.6, "listops", "test/acc"))
    write_run(tmp_path, "2", record("softmax", 0, 2.0, "lm", "test/bpc"))
    write_run(tmp_path, "3", record("favor", 0, 0.3, "listops", "test/acc"))
    main([str(tmp_path), "--rows", "attention", "--pivot", "task", "--avg"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| attention | listops test/acc | lm test/bpc | Avg |"
    assert lines[2] == "| favor | 0.3 (n=1) | missing | n/a |"
    assert lines[3] == "| softmax | 0.5 ± 0.1414 (n=2) | 2 (n=1) | 1.25 |"
