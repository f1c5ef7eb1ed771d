"""Sweeps on the command line: the compact multirun summary (launch order, intervals, failed jobs apart, rows split
by the other swept values, the exit status), the summary callback of every multirun, and the thread count of
parallel sweep jobs (joblib)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from scipy import stats as scipy_stats

from efficient_attn_tasks.commands import report
from efficient_attn_tasks.commands.train import RunSummary
from efficient_attn_tasks.config.checks import CONFIG_DIR
from efficient_attn_tasks.report.stats import as_number
from efficient_attn_tasks.report.summary import summarize, summary
from efficient_attn_tasks.run.fit import default_threads
from tests.helpers import REPO, TINY_MQAR

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- the multirun summary
def _job(root: Path, num: int, choice: str, seed: int, score: float | None, lr: float = 1e-3) -> None:
    """A fake multirun job dir: .hydra/ with its choices, job number and overrides; results.json unless
    ``score`` is None (a failed job)."""
    run_dir = root / f"{num}_{choice}"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "hydra.yaml").write_text(
        f"hydra:\n  job:\n    num: {num}\n  runtime:\n    choices:\n      attention: {choice}\n"
        "      task: translation\n")
    (run_dir / ".hydra" / "overrides.yaml").write_text(
        f"- attention={choice}\n- seed={seed}\n- optim.lr={lr}\n- experiment=quickstart\n")
    if score is None:
        return
    record = {"name": "quickstart", "task": "translation", "attention": choice.split("_")[0], "seed": seed,
              "config": {"seed": seed, "optim": {"lr": lr}},
              "metrics": {"monitor": "val/bleu", "val_best": score - 1, "val_last": {"val/bleu": score - 1},
                          "test": {"test/bleu": score, "test/loss": 1.0}},
              "num_parameters": 1000, "steps": 100, "train_tokens_per_s": 2000.0 + seed, "peak_memory_mib": 500.0,
              "wall_time_s": 60.0}
    (run_dir / "results.json").write_text(json.dumps(record))


def _failed(root: Path, num: int, choice: str, seed: int, steps: int = 0) -> Path:
    """A fake failed job: its .hydra/ and a failed record (efficient_attn_tasks/run/record.py ``failed_record``)."""
    _job(root, num, choice, seed, None)
    record = {"name": "quickstart", "task": "translation", "attention": choice, "seed": seed, "status": "failed",
              "error": {"type": "DataError", "message": f"job {num} has no data; set data_dir"}, "steps": steps}
    (root / f"{num}_{choice}" / "results.json").write_text(json.dumps(record))
    return root / f"{num}_{choice}"


def _table(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("|")]


def test_multirun_summary_is_compact_in_launch_order_with_ci_and_failed_runs(tmp_path):
    for num, (choice, seed, score) in enumerate([("softmax", 0, 30.0), ("favor_plus", 0, 29.0), ("softmax", 1, 32.0),
                                                 ("favor_plus", 1, 27.0), ("linear", 0, None), ("bilinear", 0, 20.0),
                                                 ("additive", 0, 25.0), ("dot", 0, 21.0), ("taylor", 0, 22.0),
                                                 ("hedgehog", 0, 23.0), ("cosformer", 0, 24.0)]):
        _job(tmp_path, num, choice, seed, score)
    text = summary(tmp_path)
    rows = _table(text)
    assert rows[0] == ["attention", "n", "test/bleu", "tokens/s", "peak MiB", "wall s"]
    labels = [r[0] for r in rows[2:]]
    assert labels[:-1] == ["softmax", "favor_plus", "bilinear", "additive", "dot", "taylor", "hedgehog", "cosformer"]
    half = scipy_stats.t.ppf(0.975, 1) * scipy_stats.tstd([30.0, 32.0]) / 2 ** 0.5
    assert rows[2] == ["softmax", "2", f"31 ± {as_number(half)}", "2,000", "500", "60"]  # tokens/s: mean of 2000, 2001
    assert rows[3][:3] == ["favor_plus", "2", f"28 ± {as_number(half)}"]  # the config name, not the registry's favor
    assert rows[4][:3] == ["bilinear", "1", "20"]  # one seed: no interval
    assert labels[-1].startswith("linear (no results.json, seed 0, job 4") and rows[-1][1:] == ["0", *["n/a"] * 4]
    assert text.splitlines()[0] == f"10 run(s) in {tmp_path}, 1 without results.json"
    assert text.splitlines()[-1] == f"Full table (every metric): efficient-attn-report {tmp_path} --rows attention --ci"


def test_multirun_summary_lists_failed_jobs_with_run_dir_and_error_apart_from_the_means(tmp_path):
    _job(tmp_path, 0, "softmax", 0, 30.0)
    first = _failed(tmp_path, 1, "softmax", 1, steps=7)
    _job(tmp_path, 2, "softmax", 2, 32.0)
    _job(tmp_path, 3, "linear", 0, None)  # no results.json
    second = _failed(tmp_path, 4, "favor_plus", 0)
    text, failed = summarize(tmp_path)
    assert failed == 3  # the exit code's count: failed records and jobs without results.json
    lines = text.splitlines()
    assert lines[0] == f"2 run(s) in {tmp_path}, 2 failed, 1 without results.json"
    rows = _table(text)
    assert rows[2][:3] == ["softmax", "2", "31 ± 12.71"]  # seeds 0 and 2 only
    assert [r[0] for r in rows[3:]] == ["softmax (failed at step 7, seed 1, job 1)",
                                       "linear (no results.json, seed 0, job 3: failed, killed or running)",
                                       "favor_plus (failed at step 0, seed 0, job 4)"]
    start = lines.index("Failed jobs (results.json status failed; ckpt_path=last with the same hydra.sweep.dir runs "
                        "them again):")
    assert lines[start + 1:] == [f"  {first}: DataError: job 1 has no data; set data_dir",
                                 f"  {second}: DataError: job 4 has no data; set data_dir",
                                 f"Full table (every metric): efficient-attn-report {tmp_path} --rows attention --ci"]


def test_the_sweep_exits_1_after_its_summary_when_a_job_failed(tmp_path, capsys):
    from omegaconf import OmegaConf

    _job(tmp_path, 0, "softmax", 0, 30.0)
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    RunSummary().on_multirun_end(config)  # every job finished: no exit
    assert capsys.readouterr().out.startswith(f"\n1 run(s) in {tmp_path}\n")
    _failed(tmp_path, 1, "softmax", 1)
    with pytest.raises(SystemExit) as exit_:
        RunSummary().on_multirun_end(config)
    out = capsys.readouterr()
    assert exit_.value.code == 1 and "Failed jobs" in out.out and "1 job(s) of this launch failed" in out.err


def test_a_job_another_launch_is_running_is_listed_and_not_counted_as_failed(tmp_path, capsys):
    """Two launches share a sweep dir: the job the other one runs holds its dir's lock (RunDirGuard.on_job_start),
    so this launch's summary lists it as running and does not exit 1 for it; once released, it counts again."""
    from omegaconf import OmegaConf

    from efficient_attn_tasks.run.lock import RunDirBusy, RunDirGuard, hold_run_dir, holder

    _job(tmp_path, 0, "softmax", 0, 30.0)
    _job(tmp_path, 1, "linear", 0, None)  # no results.json
    job = OmegaConf.create({"hydra": {"mode": "MULTIRUN", "runtime": {"output_dir": str(tmp_path / "1_linear")}}})
    other = RunDirGuard()
    other.on_job_start(job)  # the other launch's job, live
    assert holder(tmp_path / "1_linear") == str(os.getpid())
    second = RunDirGuard()
    second.on_job_start(job)  # the same job cannot run twice: no lock, and no warning from Hydra
    assert second.lock is None and holder(tmp_path / "1_linear") == str(os.getpid())
    with pytest.raises(RunDirBusy):
        hold_run_dir(tmp_path / "1_linear")
    text, failed = summarize(tmp_path)
    assert failed == 0 and text.splitlines()[0] == f"1 run(s) in {tmp_path}, 1 running in another launch"
    assert _table(text)[-1][0] == f"linear (running, seed 0, job 1, pid {os.getpid()})"
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    RunSummary().on_multirun_end(config)  # no exit
    other.on_job_end(job)
    assert holder(tmp_path / "1_linear") is None
    assert summarize(tmp_path)[1] == 1
    single = OmegaConf.create({"hydra": {"mode": "RUN", "runtime": {"output_dir": str(tmp_path / "2")}}})
    RunDirGuard().on_job_start(single)  # a single run holds its lock from on_run_start, not here
    assert not (tmp_path / "2").exists()
    capsys.readouterr()


def test_only_the_jobs_this_launch_started_set_its_exit_code(tmp_path, capsys):
    """Two launches share a sweep dir: a failed (or interrupted) job the other launch started last is listed in
    this launch's summary but does not make it exit 1; this launch's own failed job does. A job no launch marked
    (an older version's) is no launch's; without a launch id, every failed job counts."""
    import pickle

    from omegaconf import OmegaConf

    from efficient_attn_tasks.run.lock import RunDirGuard, hold_run_dir, launch_of

    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    ours, theirs = RunSummary(), RunSummary()
    ours.on_multirun_start(config)
    theirs.on_multirun_start(config)
    assert ours.launch and theirs.launch and ours.launch != theirs.launch

    def start(callback: RunSummary, run_dir: Path) -> None:  # Hydra's on_job_start, in the job's process
        job = OmegaConf.create({"hydra": {"mode": "MULTIRUN", "runtime": {"output_dir": str(run_dir)}}})
        guard = RunDirGuard()
        guard.on_job_start(job)
        pickle.loads(pickle.dumps(callback)).on_job_start(job)  # a joblib worker's copy keeps the launch id
        guard.on_job_end(job)

    _job(tmp_path, 0, "softmax", 0, 30.0)
    start(ours, tmp_path / "0_softmax")
    start(theirs, _failed(tmp_path, 1, "linear", 0))
    mine = _failed(tmp_path, 2, "favor_plus", 0)
    assert summarize(tmp_path, ours.launch)[1] == 0 and summarize(tmp_path)[1] == 2  # job 2 is nobody's yet
    start(ours, mine)
    assert launch_of(mine) == ours.launch and launch_of(tmp_path / "1_linear") == theirs.launch
    assert summarize(tmp_path, ours.launch)[1] == 1 and summarize(tmp_path, theirs.launch)[1] == 1
    with pytest.raises(SystemExit) as exit_:
        ours.on_multirun_end(config)
    out = capsys.readouterr()
    assert exit_.value.code == 1 and "1 job(s) of this launch failed" in out.err
    assert ("1 of the failed jobs or jobs without results.json were not last started by this launch: they do not "
            "count in its exit code") in out.out
    held = hold_run_dir(mine)  # a third process runs job 2 (its pid in the lock file)
    held.seek(0), held.truncate(), held.write("999999999\n"), held.flush()
    start(theirs, mine)  # a third process holds job 2: the other launch skips it and does not mark it
    held.close()
    assert launch_of(mine) == ours.launch
    start(theirs, mine)  # the other launch runs job 2 again (and it fails again): now it is theirs
    ours.on_multirun_end(config)  # no exit
    with pytest.raises(SystemExit):
        theirs.on_multirun_end(config)
    capsys.readouterr()


def test_a_job_another_launch_holds_is_skipped_not_trained_a_second_time(tmp_path):
    """Hydra only warns when a callback raises, so RunDirBusy in on_job_start alone does not stop the job: the job
    itself must see that another process holds its dir and return without training (two launches of one sweep
    dir once trained the same run in the same dir at the same time)."""
    from efficient_attn_tasks.run.lock import hold_run_dir

    sweep = tmp_path / "sweep"
    held = hold_run_dir(sweep / "job")  # the other launch: this test's process
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "WANDB_MODE": "disabled"}
    argv = [sys.executable, "-m", "efficient_attn_tasks.commands.train", "-m", "task=mqar", *TINY_MQAR, "model=tiny",
            "trainer.max_epochs=1", "logger=none", "attention=softmax", f"hydra.sweep.dir={sweep}",
            "hydra.sweep.subdir=job", "ckpt_path=last"]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    finally:
        held.close()
    assert out.returncode == 0, out.stderr
    assert f"job {sweep / 'job'} is running in another launch (pid {os.getpid()})" in out.stderr
    assert "Callback RunDirGuard" not in out.stderr  # no warning from Hydra before the skip line
    assert not (sweep / "job" / ".launch").exists()  # the job is the other launch's
    assert "1 running in another launch" in out.stdout
    assert not (sweep / "job" / "results.json").exists() and not (sweep / "job" / "checkpoints").exists()
    out = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)  # released: it runs
    assert out.returncode == 0, out.stderr
    assert json.loads((sweep / "job" / "results.json").read_text())["status"] == "ok"


def test_every_multirun_ends_with_the_summary():
    for overrides in ([], ["experiment=quickstart"], ["experiment=mqar/quick"]):
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose("train", overrides=overrides, return_hydra_config=True)
        targets = [c._target_ for c in cfg.hydra.callbacks.values()]
        assert targets == ["efficient_attn_tasks.run.lock.RunDirGuard",
                           "efficient_attn_tasks.commands.train.RunSummary"], overrides


def test_multirun_summary_splits_rows_by_other_swept_values(tmp_path, capsys):
    for num, (lr, seed, score) in enumerate([(1e-3, 0, 30.0), (1e-3, 1, 31.0), (3e-3, 0, 20.0), (3e-3, 1, 22.0)]):
        _job(tmp_path, num, "softmax", seed, score, lr=lr)
    text = summary(tmp_path)
    rows = _table(text)
    assert rows[0][0] == "attention / optim.lr" and [r[:2] for r in rows[2:]] == [["softmax / 0.001", "2"],
                                                                                  ["softmax / 0.003", "2"]]
    command = text.splitlines()[-1].split(": ", 1)[1]
    assert command == f"efficient-attn-report {tmp_path} --rows attention,config.optim.lr --ci"
    report.main(command.split()[1:])  # the printed command works and gives the same rows
    full = _table(capsys.readouterr().out)
    assert [r[:2] for r in full[2:]] == [["softmax / 0.001", "2"], ["softmax / 0.003", "2"]]


# ----------------------------------------------------------------------------- threads of parallel sweep jobs
@pytest.mark.parametrize("threads, n_jobs, cpus, expected", [
    (None, None, 16, None),  # not under joblib: torch's default
    (None, 2, 16, 8),  # 2 jobs at once share 16 cores
    (None, 3, 2, 1),  # never below one thread
    (None, 1, 16, None),  # one job at a time: torch's default
    (None, -1, 8, 1),  # joblib's -1: as many jobs as CPUs
    (None, -3, 8, 1),  # 8 + 1 - 3 = 6 jobs
    (None, -7, 8, 4),  # 2 jobs
    (4, 2, 16, 4),  # an explicit threads=N wins
    (0, 2, 16, 8),  # 0 is unset, as in the config check
])
def test_default_threads(threads, n_jobs, cpus, expected):
    assert default_threads(threads, n_jobs, cpus) == expected


APP = """
import os, sys
import hydra
from hydra.core.config_store import ConfigStore
from efficient_attn_tasks.run.fit import default_threads, joblib_n_jobs

@hydra.main(version_base="1.3", config_path=None, config_name="cfg")
def app(cfg):  # one file per job: parallel jobs' prints would interleave
    with open(f"job{cfg.x}.txt", "w") as f:
        f.write(f"JOB {cfg.x} {joblib_n_jobs()} {default_threads(None, joblib_n_jobs(), 4)}")

ConfigStore.instance().store(name="cfg", node={"x": 0, "defaults": ["_self_", {"override hydra/launcher": "joblib"}]})
app()
"""


def test_joblib_jobs_are_read_from_the_hydra_config(tmp_path):
    (tmp_path / "app.py").write_text(APP)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}

    def jobs(*args: str) -> list[str]:
        out = subprocess.run([sys.executable, "app.py", *args], capture_output=True, text=True, env=env, cwd=tmp_path,
                             timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        found = sorted(p.read_text() for p in tmp_path.glob("job*.txt"))
        for p in tmp_path.glob("job*.txt"):
            p.unlink()
        return found

    assert jobs("-m", "x=1,2", "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={tmp_path / 'm'}") == \
        ["JOB 1 2 2", "JOB 2 2 2"]  # 4 CPUs // 2 jobs
    assert jobs("x=3", f"hydra.run.dir={tmp_path / 'r'}") == ["JOB 3 None None"]  # a single run
