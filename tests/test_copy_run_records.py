"""tools/copy_run_records.py: finished and failed runs copied with their config and curves; interrupted ones not."""

import json

from tools.copy_run_records import copy_records


def test_finished_and_failed_runs_are_copied_with_config_curves_and_best_step(tmp_path):
    sweep, dest = tmp_path / "sweep", tmp_path / "dest"
    for name, status in (("a", "ok"), ("b", "failed"), ("c", "interrupted")):
        run = sweep / name
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "config.yaml").write_text("seed: 0\n")
        (run / "checkpoints").mkdir()
        (run / "checkpoints" / "best-step=40.ckpt").write_bytes(b"")
        (run / "curves.csv").write_text("step,val/acc\n40,0.5\n")
        (run / "results.json").write_text(json.dumps({"status": status}))
    assert copy_records(sweep, dest) == 2
    assert sorted(p.name for p in dest.iterdir()) == ["a", "b"]
    assert json.loads((dest / "a" / "results.json").read_text()) == {"status": "ok", "best_step": 40}
    assert (dest / "b" / "curves.csv").read_text() == "step,val/acc\n40,0.5\n"
    assert (dest / "a" / ".hydra" / "config.yaml").is_file() and not (dest / "a" / "checkpoints").exists()
