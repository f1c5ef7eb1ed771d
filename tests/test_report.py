"""efficient-attn-report: run records in, exact tables out (mean ± std, n, Δ with Welch p, pivot, missing runs)."""

import json
import re
from pathlib import Path

import pytest
from scipy import stats

from efficient_attn_tasks.commands.report import main


def record(attention: str, seed: int, score: float, task: str = "translation", metric: str = "test/bleu") -> dict:
    return {
        "name": "exp", "task": task, "attention": attention, "seed": seed,
        "metrics": {"monitor": "val/x", "val_best": score - 1, "test": {metric: score}},
        "num_parameters": 1000, "steps": 100, "train_tokens_per_s": 2000.0, "peak_memory_mib": 500.0,
        "wall_time_s": 60.0,
    }


def write_run(root, name, rec=None, attention_choice=None):
    (root / name / ".hydra").mkdir(parents=True)
    if rec is not None:
        (root / name / "results.json").write_text(json.dumps(rec))
    if attention_choice is not None:  # the config file Hydra picked, as in a real run's .hydra/hydra.yaml
        text = f"hydra:\n  runtime:\n    choices:\n      attention: {attention_choice}\n"
        (root / name / ".hydra" / "hydra.yaml").write_text(text)


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
    assert lines[0] == ("| name / task / attention | n | val/x (best) | test/bleu | num_parameters | steps "
                        "| train_tokens_per_s | peak_memory_mib | wall_time_s |")
    assert lines[2] == ("| exp / translation / favor | 2 | 27 ± 1.414 | 28 ± 1.414 | 1,000 ± 0 | 100 ± 0 | 2,000 ± 0 "
                        "| 500 ± 0 | 60 ± 0 |")
    assert lines[3] == "| exp / translation / linear | 1 | 19 | 20 | 1,000 | 100 | 2,000 | 500 | 60 |"
    assert lines[5] == f"| {tmp_path / '5'} (missing results.json) | 0 | n/a | n/a | n/a | n/a | n/a | n/a | n/a |"
    assert (tmp_path / "table.csv").read_text().count("\n") == 5
    out = capsys.readouterr().out
    assert "softmax" in out
    wrote = [str(tmp_path / name) for name in ("table.md", "table.csv", "table_stats.csv")]
    assert re.findall(r"^wrote (.+)$", out, flags=re.M) == wrote  # one line per file, each there
    assert all(Path(p).is_file() for p in wrote)


def failed(attention: str, seed: int, steps: int = 3) -> dict:
    """A failed run's record (``failed_record``): no metrics, the error and the step reached."""
    return {"name": "exp", "task": "translation", "attention": attention, "seed": seed, "status": "failed",
            "error": {"type": "FloatingPointError", "message": "non-finite loss at step 3 | lower optim.lr"},
            "config": {"seed": seed}, "overrides": [f"seed={seed}"], "steps": steps, "wall_time_s": 1.0}


def test_failed_runs_are_listed_as_failed_and_never_averaged(tmp_path, capsys):
    runs(tmp_path)
    write_run(tmp_path, "6", {**record("softmax", 2, 0.0), "status": "failed", **failed("softmax", 2)})
    write_run(tmp_path, "7", {**record("favor", 2, 28.0), "status": "ok"})  # status ok: a finished run
    main([str(tmp_path), "--rows", "attention"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[4] == "| softmax | 2 | 30 ± 1.414 | 31 ± 1.414 | 1,000 ± 0 | 100 ± 0 | 2,000 ± 0 | 500 ± 0 | 60 ± 0 |"
    assert lines[2].startswith("| favor | 3 | 27 ± 1 | 28 ± 1 |")  # records without status (older ones) count as ok
    assert lines[5] == (f"| {tmp_path / '6'} (failed at step 3: FloatingPointError: non-finite loss at step 3 \\| "
                        "lower optim.lr) | 0 | n/a | n/a | n/a | n/a | n/a | n/a | n/a |")  # "|" escaped for Markdown
    assert lines[6].startswith(f"| {tmp_path / '5'} (missing results.json) | 0 |")
    main([str(tmp_path), "--rows", "attention", "--pivot", "task"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[4] == "| softmax | 31 ± 1.414 (n=2) |"
    assert lines[5].startswith(f"| {tmp_path / '6'} (failed at step 3: FloatingPointError:")
    assert lines[5].endswith(" | n/a |")


def test_a_sweep_of_failed_runs_only_is_a_table_of_failures(tmp_path, capsys):
    write_run(tmp_path, "0", failed("softmax", 0, steps=0))
    main([str(tmp_path), "--rows", "attention"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| attention | n |" and lines[2].startswith(f"| {tmp_path / '0'} (failed at step 0: ")


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
    assert lines[0] == "| attention | listops test/acc | lm test/bpc | Avg (listops) |"  # bits/byte not averaged
    assert lines[2] == "| favor | 0.3 (n=1) | missing | 0.3 |"
    assert lines[3] == "| softmax | 0.5 ± 0.1414 (n=2) | 2 (n=1) | 0.5 |"


def test_average_over_accuracy_tasks_needs_every_one(tmp_path, capsys):
    write_run(tmp_path, "0", record("softmax", 0, 0.4, "listops", "test/acc"))
    write_run(tmp_path, "1", record("softmax", 0, 30.0, "translation", "test/bleu"))
    write_run(tmp_path, "2", record("favor", 0, 0.3, "listops", "test/acc"))
    main([str(tmp_path), "--rows", "attention", "--pivot", "task", "--avg"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("| Avg |") and lines[2].endswith("| missing | n/a |") and lines[3].endswith("| 15.2 |")


def val_record(row: str, seed: int, bleu: float, ppl: float) -> dict:
    """A run with test=false (Table 3 style): last validation metrics, no test metrics."""
    rec = record("softmax", seed, bleu)
    rec.update(row=row, metrics={"monitor": "val/bleu", "val_best": bleu, "test": {},
                                 "val_last": {"val/bleu": bleu, "val/ppl": ppl, "val/loss": 1.0}})
    return rec


def table3_runs(tmp_path):
    for i, (row, seed, bleu, ppl) in enumerate([("base", 0, 20.0, 5.0), ("base", 1, 22.0, 4.0),
                                                 ("heads1", 0, 17.0, 6.0), ("heads1", 1, 18.0, 7.0),
                                                 ("dk16", 0, 19.0, 5.5)]):
        write_run(tmp_path, str(i), val_record(row, seed, bleu, ppl))


def test_last_validation_metrics_are_columns_after_best_val(tmp_path, capsys):
    table3_runs(tmp_path)
    main([str(tmp_path), "--rows", "row"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("| row | n | val/bleu (best) | val/bleu (last) | val/loss (last) | val/ppl (last) "
                        "| num_parameters | steps | train_tokens_per_s | peak_memory_mib | wall_time_s |")
    assert lines[2].startswith("| base | 2 | 21 ± 1.414 | 21 ± 1.414 | 1 ± 0 | 4.5 ± 0.7071 |")


def test_baseline_delta_covers_last_val_metrics_without_test_metrics(tmp_path, capsys):
    table3_runs(tmp_path)
    main([str(tmp_path), "--rows", "row", "--baseline", "base"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("| Δ val/bleu (last) (p) | Δ val/loss (last) (p) | Δ val/ppl (last) (p) |")
    p_bleu = stats.ttest_ind([17.0, 18.0], [20.0, 22.0], equal_var=False).pvalue
    p_ppl = stats.ttest_ind([6.0, 7.0], [5.0, 4.0], equal_var=False).pvalue
    assert lines[4].endswith(f"| -3.5 ({p_bleu:.3g}) | +0 (1) | +2 ({p_ppl:.3g}) |")  # heads1
    assert lines[3].endswith("| -2 (n<2) | +0 (n<2) | +1 (n<2) |")  # dk16: one run


def test_metrics_option_keeps_named_columns_n_and_resources(tmp_path, capsys):
    table3_runs(tmp_path)
    main([str(tmp_path), "--rows", "row", "--metrics", "val/ppl (last), val/bleu (last)", "--baseline", "base"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("| row | n | val/ppl (last) | val/bleu (last) | num_parameters | steps | train_tokens_per_s "
                        "| peak_memory_mib | wall_time_s | Δ val/ppl (last) (p) | Δ val/bleu (last) (p) |")
    assert lines[3] == "| dk16 | 1 | 5.5 | 19 | 1,000 | 100 | 2,000 | 500 | 60 | +1 (n<2) | -2 (n<2) |"


def test_the_best_val_column_is_the_monitor_and_its_older_spelling_still_selects_it(tmp_path, capsys):
    table3_runs(tmp_path)
    for spelling in ("val/bleu (best)", "val val/bleu (best)"):
        main([str(tmp_path), "--rows", "row", "--metrics", spelling, "--baseline", "base"])
        lines = capsys.readouterr().out.splitlines()
        assert lines[0] == ("| row | n | val/bleu (best) | num_parameters | steps | train_tokens_per_s "
                            "| peak_memory_mib | wall_time_s |")  # no Δ: the best val selected the model
    main([str(tmp_path), "--rows", "row", "--metrics", "val/bleu (best)", "--ci",
          "--bounds", "val val/bleu (best)=0,100"])
    assert "| base | 2 | 21 [20, 22] |" in capsys.readouterr().out  # bounded: a bootstrap interval inside [0, 100]


def test_unknown_metric_is_an_error_listing_the_known_ones(tmp_path):
    table3_runs(tmp_path)
    with pytest.raises(SystemExit, match=r"unknown metric\(s\) \['val/blue'\]; known: .*'val/bleu \(last\)'"):
        main([str(tmp_path), "--metrics", "val/blue"])
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--metrics", "val/bleu (last)", "--pivot", "task"])


def test_wandb_option_runs_disabled_and_finishes(tmp_path, capsys):
    import os

    import wandb

    assert os.environ["WANDB_MODE"] == "disabled"
    table3_runs(tmp_path)
    main([str(tmp_path), "--rows", "row", "--wandb", "efficient-attn-test"])
    assert wandb.run is None and "| base | 2 |" in capsys.readouterr().out


class FakeRun:
    def __init__(self, **kwargs):
        self.kwargs, self.logged = kwargs, []

    def log(self, data):
        self.logged.append(data)


def test_wandb_option_logs_the_table_offline_unless_logged_in(tmp_path, monkeypatch, capsys):
    import wandb

    runs_started, finished = [], []
    monkeypatch.setattr(wandb, "init", lambda **kw: runs_started.append(FakeRun(**kw)) or runs_started[-1])
    monkeypatch.setattr(wandb, "finish", lambda: finished.append(True))
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: not logged in
    table3_runs(tmp_path / "runs")
    main([str(tmp_path / "runs"), "--rows", "row", "--metrics", "val/bleu (last)", "--wandb", "proj"])
    lines = capsys.readouterr().out.splitlines()
    (run,) = runs_started
    assert run.kwargs["project"] == "proj" and run.kwargs["job_type"] == "report" and run.kwargs["mode"] == "offline"
    assert run.kwargs["config"]["metrics"] == "val/bleu (last)" and finished == [True]
    (logged,) = run.logged
    table = logged["report/table"]
    assert isinstance(table, wandb.Table)
    assert table.columns == [c.strip() for c in lines[0].strip("|").split("|")]
    assert table.columns[:3] == ["row", "n", "val/bleu (last)"] and len(table.data) == 3


def test_wandb_online_start_that_fails_falls_back_to_offline(tmp_path, monkeypatch):
    import wandb

    modes = []

    def init(**kw):
        modes.append(kw["mode"])
        if kw["mode"] == "online":
            raise TimeoutError("no network")
        return FakeRun(**kw)

    monkeypatch.setattr(wandb, "init", init)
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)  # looks logged in
    table3_runs(tmp_path)
    with pytest.warns(UserWarning, match="logging offline instead"):
        main([str(tmp_path), "--wandb", "proj"])
    assert modes == ["online", "offline"] and wandb.run is None


def test_rows_by_config_file_choice_and_by_the_configs_row(tmp_path, capsys):
    for name, choice in (("0", "favor_plus"), ("1", "favor_trig")):
        rec = record("favor", 0, 10.0)
        rec["config"] = {"row": f"r{name}"}
        write_run(tmp_path, name, rec, attention_choice=choice)
    main([str(tmp_path), "--rows", "choices.attention,row", "--metrics", "test/bleu"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].startswith("| favor_plus / r0 | 1 | 10 |") and lines[3].startswith("| favor_trig / r1 | 1 | 10 |")


def test_attention_rows_name_the_config_file_not_the_shared_registry_name(tmp_path, capsys):
    for name, choice in (("0", "favor_plus"), ("1", "favor_trig")):
        write_run(tmp_path, name, record("favor", 0, 10.0), attention_choice=choice)
    main([str(tmp_path), "--rows", "attention"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].startswith("| favor_plus | 1 |") and lines[3].startswith("| favor_trig | 1 |")


def test_per_layer_runs_keep_their_label_not_the_attention_choice(tmp_path, capsys):
    """A model.layer_attentions run composes attention=softmax; its row is the layers' label."""
    write_run(tmp_path, "0", record("softmax", 0, 10.0), attention_choice="softmax")
    hybrid = record("taylor+sliding_window_w16", 0, 20.0)
    hybrid["config"] = {"model": {"layer_attentions": ["taylor", "sliding_window_w16"]}}
    write_run(tmp_path, "1", hybrid, attention_choice="softmax")
    main([str(tmp_path), "--rows", "attention"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].startswith("| softmax | 1 |") and lines[3].startswith("| taylor+sliding_window_w16 | 1 |")


def test_a_rows_or_tune_key_no_record_has_is_an_error_naming_what_is_there(tmp_path, capsys):
    """A misspelt key would group every run into one row labelled None; a key whose value is null is a key."""
    for name, decoder in (("0", "gla"), ("1", None)):
        rec = record("softmax", int(name), 30.0)
        rec["config"] = {"model": {"decoder_attention": decoder, "encoder_attention": None}, "optim": {"lr": 1e-3}}
        write_run(tmp_path, name, rec)

    def error(*argv: str) -> str:
        with pytest.raises(SystemExit) as exit_:
            main([str(tmp_path), *argv])
        assert exit_.value.code == 2
        return capsys.readouterr().err

    assert "error: --rows config.model.decoder_attention.name: no run record has config.model.decoder_attention" \
           ".name; config.model.decoder_attention is a value ('gla'), not a section" in \
           error("--rows", "attention,config.model.decoder_attention.name")
    assert "--tune config.optim.rate: no run record has config.optim.rate; config.optim has ['lr']" in \
           error("--tune", "config.optim.rate")
    assert "--rows atention: no run record has atention;" in error("--rows", "atention")
    main([str(tmp_path), "--rows", "attention,config.model.decoder_attention", "--metrics", "test/bleu"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].startswith("| softmax / None | 1 | 30 |") and lines[3].startswith("| softmax / gla | 1 | 30 |")
    main([str(tmp_path), "--rows", "attention,config.model.encoder_attention", "--metrics", "test/bleu"])  # null in all
    assert capsys.readouterr().out.splitlines()[2].startswith("| softmax / None | 2 | 30 ± 0 |")


def test_default_gives_records_written_before_a_key_existed_its_value(tmp_path, capsys):
    """--default config.transfer_steps=0: old records (no key) join the rows of new ones that recorded 0; a record
    with the key, null included, keeps its own value."""
    for name, steps in (("0", "absent"), ("1", 0), ("2", 200), ("3", None)):
        rec = record("linear", int(name), 30.0 + int(name))
        rec["config"] = {"optim": {"lr": 1e-3}} if steps == "absent" else {"transfer_steps": steps}
        write_run(tmp_path, name, rec)
    argv = [str(tmp_path), "--rows", "attention,config.transfer_steps", "--metrics", "test/bleu"]

    def rows(*extra: str) -> list[str]:
        main([*argv, *extra])
        return [line.split(" | ")[0] + " | " + line.split(" | ")[1] for line in capsys.readouterr().out.splitlines()
                if line.startswith("| linear")]

    assert rows() == ["| linear / 0 | 1", "| linear / 200 | 1", "| linear / None | 2"]
    assert rows("--default", "config.transfer_steps=0") == [
        "| linear / 0 | 2", "| linear / 200 | 1", "| linear / None | 1"]
    assert rows("--default", "config.transfer_steps=7", "--default", "config.optim.lr=5") == [
        "| linear / 0 | 1", "| linear / 7 | 1", "| linear / 200 | 1", "| linear / None | 1"]
    with pytest.raises(SystemExit, match="expected config"):
        main([*argv, "--default", "transfer_steps=0"])
