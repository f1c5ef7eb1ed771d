"""efficient-attn-report: run records in, mean ± std table out, missing runs listed."""

import json

from tasks.report import main


def record(attention: str, seed: int, bleu: float) -> dict:
    return {
        "name": "exp", "task": "translation", "attention": attention, "seed": seed,
        "metrics": {"monitor": "val/bleu", "val_best": bleu - 1, "test": {"test/bleu": bleu}},
        "num_parameters": 1000, "train_tokens_per_s": 2000.0, "peak_memory_mib": 500.0, "wall_time_s": 60.0,
    }


def write_run(root, name, rec=None):
    (root / name / ".hydra").mkdir(parents=True)
    if rec is not None:
        (root / name / "results.json").write_text(json.dumps(rec))


def test_report_groups_seeds_and_lists_missing_runs(tmp_path, capsys):
    write_run(tmp_path, "0", record("softmax", 0, 30.0))
    write_run(tmp_path, "1", record("softmax", 1, 32.0))
    write_run(tmp_path, "2", record("favor", 0, 29.0))
    write_run(tmp_path, "3")  # crashed: no results.json
    main([str(tmp_path), "--out", str(tmp_path / "table")])
    lines = (tmp_path / "table.md").read_text().splitlines()
    assert lines[0] == ("| experiment | task | attention | n | val val/bleu (best) | test/bleu | num_parameters "
                        "| train_tokens_per_s | peak_memory_mib | wall_time_s |")
    assert lines[2] == "| exp | translation | favor | 1 | 28 | 29 | 1,000 | 2,000 | 500 | 60 |"
    assert lines[3] == "| exp | translation | softmax | 2 | 30 ± 1.414 | 31 ± 1.414 | 1,000 ± 0 | 2,000 ± 0 | 500 ± 0 | 60 ± 0 |"
    assert lines[4].startswith(f"| {tmp_path / '3'} |") and "missing results.json" in lines[4]
    assert (tmp_path / "table.csv").read_text().count("\n") == 4
    assert "softmax" in capsys.readouterr().out
