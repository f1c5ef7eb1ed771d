"""The run record (results.json): round trips, the keys it writes, every committed record and hand-written
format 1 records read, unknown keys kept, failed records, and the status that resuming reads."""

import json
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from efficient_attn_tasks.run.record import (
    MESSAGE_CHARS,
    RECORD_VERSION,
    Attempt,
    Metrics,
    RunError,
    RunRecord,
    failed_record,
    record_status,
    summary_line,
    training_verdict,
    write_failed_record,
)

REPO = Path(__file__).resolve().parent.parent
COMMITTED = sorted((REPO / "results").rglob("results.json"))

OK_KEYS = ["version", "name", "task", "attention", "attention_config", "seed", "status", "config", "overrides",
           "metrics", "bleu_signature", "num_parameters", "epochs", "steps", "stopped_step", "best_step", "converged",
           "feature_redraws", "processes", "train_tokens",
           "train_tokens_per_s", "train_tokens_per_s_scope", "peak_memory_mib", "fit_time_s", "wall_time_s",
           "hardware", "versions", "skipped_updates", "scaler_skipped_steps", "precision", "resumed_from", "threads"]
OPTIONAL_KEYS = ["transfer"]  # after OK_KEYS, only where the run set them
FAILED_KEYS = ["version", "name", "task", "attention", "seed", "status", "error", "config", "overrides", "steps",
               "resumed_from", "wall_time_s", "versions"]


def finished() -> RunRecord:
    """A finished run's record with every field the trainer sets."""
    return RunRecord(
        name="exp", task="listops", attention="favor", attention_config="favor_relu", seed=1, status="ok",
        config={"seed": 1, "model": {"d_model": 32}}, overrides=["attention=favor_relu", "seed=1"],
        metrics=Metrics(monitor="val/acc", val_best=0.5, val_last={"val/acc": 0.25, "val/loss": 2.5},
                        test={"test/acc": 0.375}, best_checkpoint="/runs/x/checkpoints/best-step=4.ckpt",
                        test_checkpoint={"checkpoint": "best", "path": "/runs/x/checkpoints/best-step=4.ckpt",
                                         "step": 4}),
        bleu_signature=None, num_parameters=1234, epochs=2, steps=8, stopped_step=8, best_step=4, converged=None,
        feature_redraws=0, processes=1, train_tokens=4096,
        train_tokens_per_s=512.5, train_tokens_per_s_scope="global (sum over processes)", peak_memory_mib=300.25,
        fit_time_s=8.0, wall_time_s=9.5, hardware="CPU, 1 threads", versions={"python": "3.12.0", "torch": "2.4.0"},
        skipped_updates=0, scaler_skipped_steps=0, precision="32-true", resumed_from=None, threads=1)


def failed() -> RunRecord:
    return RunRecord(name="exp", task="listops", attention="softmax", seed=0, status="failed",
                     error=RunError("FloatingPointError", "non-finite loss at step 3"), config={"seed": 0},
                     overrides=["optim.lr=1e30"], steps=3, resumed_from=None, wall_time_s=1.5,
                     versions={"python": "3.12.0"})


def test_a_finished_record_round_trips_and_writes_the_keys_readers_know():
    record = finished()
    text = record.to_json()
    assert text.endswith("}\n") and json.loads(text) == record.to_dict()
    assert list(json.loads(text)) == OK_KEYS  # the trainer's keys, in its order, "version" first
    assert list(json.loads(text)["metrics"]) == ["monitor", "val_best", "val_last", "test", "best_checkpoint",
                                                 "test_checkpoint"]
    assert json.loads(text)["version"] == RECORD_VERSION
    assert RunRecord.from_json(text) == record == RunRecord.from_json(json.loads(text))


def test_a_failed_record_round_trips_without_metrics():
    record = failed()
    saved = json.loads(record.to_json())
    assert list(saved) == FAILED_KEYS and saved["error"] == {"type": "FloatingPointError",
                                                             "message": "non-finite loss at step 3"}
    back = RunRecord.from_json(record.to_json())
    assert back == record and back.failed and back.metrics is None


def test_read_and_write_use_the_file(tmp_path):
    path = tmp_path / "results.json"
    finished().write(path)
    assert RunRecord.read(path) == finished()
    assert path.read_text() == finished().to_json()


@pytest.mark.skipif(not COMMITTED, reason="no committed results under results/")
def test_every_committed_record_reads_and_writes_back_what_it_holds():
    """Committed records from results/ (formats 1 to 3; finished runs, and the failed runs a sweep keeps for
    --tune): each reads, and its JSON object keeps every key and value of the file, with the keys the file lacks
    added (defaults) and "version" stamped."""
    assert len(COMMITTED) > 100
    failed = [p for p in COMMITTED if json.loads(p.read_text()).get("status") == "failed"]
    for path in failed:  # a failed run: its error and the step it reached, no metrics
        record = RunRecord.read(path)
        assert record.failed and record.metrics is None and record.error is not None, path
        assert list(record.to_dict())[: len(FAILED_KEYS)] == FAILED_KEYS, path
    for path in (p for p in COMMITTED if p not in failed):
        raw = json.loads(path.read_text())
        record = RunRecord.read(path)
        assert record.version == raw.get("version", 1) and record.status == raw.get("status", "ok"), path
        assert record.metrics is not None and record.metrics.monitor and record.extra == {}, path
        written = record.to_dict()
        kept = {k: v for k, v in written.items() if k in raw and k not in ("version", "metrics")}
        assert kept == {k: v for k, v in raw.items() if k not in ("version", "metrics")}, path
        assert written["version"] == RECORD_VERSION, path  # a format 2 record is stamped with the current format
        assert {k: v for k, v in written["metrics"].items() if k in raw["metrics"]} == raw["metrics"], path
        assert list(written) == OK_KEYS + [k for k in OPTIONAL_KEYS if k in raw], path


def test_a_hand_written_format_1_record_gets_its_defaults_in_from_json():
    old = {"name": "exp", "task": "translation", "attention": "favor", "config": {"seed": 7, "row": "base"},
           "metrics": {"monitor": "val/bleu", "val_best": 20.0, "test": {"test/bleu": 19.5}},
           "num_parameters": 10, "steps": 100}
    before = json.loads(json.dumps(old))
    record = RunRecord.from_json(old)
    assert record.version == 1 and record.status == "ok" and not record.failed
    assert record.seed == 7  # no "seed": the config's
    assert record.overrides == [] and record.versions == {} and record.attention_config is None
    assert record.metrics == Metrics(monitor="val/bleu", val_best=20.0, val_last={}, test={"test/bleu": 19.5})
    assert record.metrics.test_checkpoint is None and record.error is None and record.extra == {}
    assert record.skipped_updates is None and record.train_tokens_per_s is None  # not recorded: None, never 0
    assert old == before  # from_json leaves the caller's object alone
    assert RunRecord.from_json(json.dumps(old)) == record


def test_a_format_2_record_without_the_training_verdict_reads_them_as_null():
    old = finished().to_dict()
    for key in ("stopped_step", "best_step", "converged", "feature_redraws"):
        del old[key]
    record = RunRecord.from_json({**old, "version": 2})
    assert record.version == 2 and record.extra == {}
    assert (record.stopped_step, record.best_step, record.converged, record.feature_redraws) == (None,) * 4
    assert list(record.to_dict()) == OK_KEYS and record.to_dict()["converged"] is None


@pytest.mark.parametrize("early_stopping, early_stopped, best_step, last_val_step, converged", [
    (True, True, 40, 60, True),      # stopped because the metric stopped improving
    (True, False, 60, 60, False),    # reached its cap with early stopping on: still improving
    (True, False, 40, 60, False),    # improved (by min_delta) within its patience, best just before
    (True, False, None, None, None),  # never validated
    (False, False, 60, 60, False),   # no early stopping, best at the last validation: still improving
    (False, False, 40, 60, None),    # no early stopping, an earlier best: cannot be told
    (False, False, None, None, None),
])
def test_training_verdict_rule(early_stopping, early_stopped, best_step, last_val_step, converged):
    assert training_verdict(early_stopping, early_stopped, best_step, last_val_step) is converged


def test_a_hand_written_failed_record_without_steps_or_error_reads():
    record = RunRecord.from_json({"status": "failed", "attention": "softmax"})
    assert record.failed and record.steps == 0 and record.error == RunError("error", "")
    assert record.metrics is None and list(record.to_dict()) == FAILED_KEYS


def test_unknown_keys_are_kept_and_written_back():
    """A newer record (version 3, a key this code does not know, at the top, in metrics and in the error)
    reads without error and writes those keys back unchanged."""
    newer = {**finished().to_dict(), "version": RECORD_VERSION + 1, "energy_j": 12.5, "extra": {"note": "x"}}
    newer["metrics"] = {**newer["metrics"], "test_ci": {"test/acc": 0.01}}
    record = RunRecord.from_json(newer)
    assert record.version == RECORD_VERSION + 1
    assert record.extra == {"energy_j": 12.5, "extra": {"note": "x"}}
    assert record.metrics.extra == {"test_ci": {"test/acc": 0.01}}
    assert record.to_dict() == {**newer, "version": RECORD_VERSION}  # written in this code's format
    error = RunRecord.from_json({**failed().to_dict(), "error": {"type": "E", "message": "m", "where": "step 3"}})
    assert error.error == RunError("E", "m", extra={"where": "step 3"})
    assert error.to_dict()["error"] == {"type": "E", "message": "m", "where": "step 3"}


@pytest.mark.parametrize("text", ["[1, 2]", '"ok"', "null"])
def test_a_record_that_is_not_an_object_is_a_value_error(text):
    with pytest.raises(ValueError, match="a run record is a JSON object"):
        RunRecord.from_json(text)


def test_record_status_reads_the_record_and_is_none_when_unreadable(tmp_path):
    cases = {"ok": finished().to_json(), "failed": failed().to_json(), "old": json.dumps({"steps": 3}),
             "cut": finished().to_json()[:40], "list": "[]"}
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
    got = {name: record_status(tmp_path / name) for name in [*cases, "absent"]}
    assert got == {"ok": "ok", "failed": "failed", "old": "ok", "cut": None, "list": None, "absent": None}


def test_failed_record_names_the_run_and_its_error_and_never_replaces_a_finished_one(tmp_path):
    cfg = OmegaConf.create({"name": "exp", "seed": 3, "task": {"name": "listops"}, "attention": {"name": "softmax"},
                            "model": {"d_model": 32}, "optim": {"lr": "${model.d_model}"}})
    err = FloatingPointError("non-finite\n   loss " + "x" * 2 * MESSAGE_CHARS)
    record = failed_record(cfg, err, Attempt(time.perf_counter(), resumed_from="/r/last.ckpt"))
    assert (record.name, record.task, record.attention, record.seed, record.status) == \
        ("exp", "listops", "softmax", 3, "failed")
    assert record.error.type == "FloatingPointError" and record.error.message.startswith("non-finite loss x")
    assert len(record.error.message) == MESSAGE_CHARS and record.steps == 0 and record.metrics is None
    assert record.config["optim"]["lr"] == 32 and record.resumed_from == "/r/last.ckpt"
    assert list(record.to_dict()) == FAILED_KEYS
    write_failed_record(cfg, tmp_path / "run", err, Attempt(time.perf_counter()))
    assert RunRecord.read(tmp_path / "run" / "results.json").failed
    finished().write(tmp_path / "run" / "results.json")
    write_failed_record(cfg, tmp_path / "run", err, Attempt(time.perf_counter()))
    assert RunRecord.read(tmp_path / "run" / "results.json") == finished()


def test_summary_line_reads_the_record():
    line = summary_line(finished())
    assert line == ("[listops / favor_relu] best val/acc=0.5 test/acc=0.375 | 1,234 params | 512.5 tok/s | "
                    "300 MiB | 10 s")
    last = finished()
    last.metrics.test_checkpoint = {"checkpoint": "last", "path": None, "step": 8}
    assert "(last weights: no best checkpoint)" in summary_line(last)
    older = finished()
    older.attention_config = None  # a format 1 record: the registry name
    assert summary_line(older).startswith("[listops / favor] ")


def test_hardware_names_the_cpu_family_and_the_isa_torch_dispatches_to(monkeypatch):
    import torch

    from efficient_attn_tasks.run import machine

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    text = machine.hardware()
    assert f"{torch.backends.cpu.get_cpu_capability()})" in text, text
    assert text.endswith(f", {torch.get_num_threads()} threads"), text
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file() and "cpu family" in cpuinfo.read_text():
        assert "family " in text and " model " in text, text
