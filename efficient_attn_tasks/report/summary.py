"""The compact table a multirun prints when it ends (``RunSummary`` in commands/train.py).

One row per attention config and value of any other swept override except the seed, in launch order: the main
metric as mean ± 95% CI over the row's runs (an accuracy: mean [lo, hi] inside [0, 1]), then tokens/s, peak
memory and wall time. Failed jobs and jobs without ``results.json`` are listed after the rows, never averaged; a
last line gives the ``efficient-attn-report`` command for the full table.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from efficient_attn_tasks.report.cells import metric_bounds
from efficient_attn_tasks.report.runs import best_column, failure, find_runs, hydra_job, metrics
from efficient_attn_tasks.report.stats import as_number, finite_values, mean_ci, mean_interval
from efficient_attn_tasks.report.tables import markdown

NOT_ROWS = {"seed", "attention", "ckpt_path"}  # overrides that never split rows (attention leads every label)
RESOURCES = (("tokens/s", "train_tokens_per_s"), ("peak MiB", "peak_memory_mib"), ("wall s", "wall_time_s"))


def main_metric(records: list[dict[str, Any]]) -> str:
    """The headline column of ``records``: the test counterpart of the monitored metric when the runs were
    tested (``val/bleu`` -> ``test/bleu``), else the monitor's best validation value (report's column name)."""
    monitor = records[0]["metrics"]["monitor"]
    test = "test/" + monitor.split("/", 1)[-1]
    if any(test in r["metrics"]["test"] for r in records):
        return test
    return best_column(monitor)


def overrides(run_dir: Path) -> dict[str, str]:
    """The job's command-line and sweep overrides (``.hydra/overrides.yaml``) as {key: value}, "+" prefixes dropped."""
    import yaml

    try:
        items = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text()) or []
    except (OSError, yaml.YAMLError):
        return {}
    pairs = (str(item).split("=", 1) for item in items if "=" in str(item))
    return {key.lstrip("+~"): value for key, value in pairs}


def swept(jobs: list[dict[str, str]]) -> list[str]:
    """Override keys whose value differs between jobs, besides the seed and the attention, in first-seen order."""
    keys = dict.fromkeys(k for job in jobs for k in job if k not in NOT_ROWS)
    return [k for k in keys if len({job.get(k) for job in jobs}) > 1]


def row_label(attention: Any, found: dict[str, str], keys: list[str]) -> str:
    """A row's label: the attention config, then the value of each swept key, " / "-joined as report's rows."""
    return " / ".join([str(attention), *(str(found.get(k)) for k in keys)])


def rows_in_launch_order(records: list[dict[str, Any]], keys: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Runs by row label, rows in the order their first job was launched (Hydra's job number)."""
    ordered = sorted(records, key=lambda r: (r.get("_job") is None, r.get("_job") or 0, r["_dir"]))
    rows: dict[str, list[dict[str, Any]]] = {}
    for r in ordered:
        rows.setdefault(row_label(r["attention"], r["_overrides"], keys), []).append(r)
    return rows


def load_sweep(sweep_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]]:
    """(run records with their overrides, failed jobs and jobs without results.json, the swept keys that
    split rows)."""
    from efficient_attn_tasks.run.lock import holder, launch_of

    records, missing, failures = find_runs([sweep_dir])
    for r in records:
        r["_overrides"] = overrides(Path(r["_dir"]))
    failed = [_failed_job(Path(r["_dir"]), r) for r in failures] + [_failed_job(path) for path in missing]
    for job in failed:
        job["running"] = holder(Path(job["dir"])) if job["error"] is None else None
        job["launch"] = launch_of(Path(job["dir"]))
    return records, failed, swept([r["_overrides"] for r in records] + [job["overrides"] for job in failed])


def compact_table(records: list[dict[str, Any]], failed: list[dict[str, Any]],
                  keys: list[str]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: attention config [swept values], n, main metric (mean ± 95% CI), tokens/s, MiB, s."""
    rows = rows_in_launch_order(records, keys)
    names = {label: main_metric(runs) for label, runs in rows.items()}
    one_metric = len(set(names.values())) <= 1
    header = [" / ".join(["attention", *keys]), "n",
              next(iter(names.values())) if one_metric and names else "main metric", *(h for h, _ in RESOURCES)]
    body = []
    for label, runs in rows.items():
        values = [metrics(r).get(names[label]) for r in runs]
        bounds = metric_bounds(names[label], values, {})
        value = mean_interval(values, bounds) if bounds is not None else mean_ci(values)
        body.append([label, str(len(runs)), value if one_metric else f"{names[label]} {value}",
                     *(_mean([r.get(key) for r in runs]) for _, key in RESOURCES)])
    for job in sorted(failed, key=_launch_order):
        seed = f", seed {job['overrides']['seed']}" if "seed" in job["overrides"] else ""
        number = f", job {job['job']}" if job["job"] is not None else ""
        what = (f"{job['status']} at step {job['steps']}{seed}{number}" if job["error"] is not None else
                f"running{seed}{number}, pid {job['running']}" if job["running"] else
                f"no results.json{seed}{number}: failed, killed or running")
        body.append([f"{row_label(job['attention'], job['overrides'], keys)} ({what})", "0",
                     *["n/a"] * (len(header) - 2)])
    return header, body


def _launch_order(job: dict[str, Any]) -> tuple[bool, int, str]:
    return job["job"] is None, job["job"] or 0, str(job["dir"])


def _failed_job(run_dir: Path, record: dict[str, Any] | None = None) -> dict[str, Any]:
    """What is known of a failed job (its failed ``record``) or of one without results.json: its attention
    config, job number, overrides, and for a failed or interrupted record its status, the error ("Type:
    message") and the step reached."""
    choices, job = hydra_job(run_dir / ".hydra")
    found = overrides(run_dir)
    attention = choices.get("attention") or found.get("attention") or (record or {}).get("attention") or run_dir.name
    error = failure(record) if record is not None else None
    return {"dir": run_dir, "job": job, "overrides": found, "attention": attention, "error": error,
            "status": record["status"] if record is not None else None,
            "steps": record["steps"] if record is not None else 0}


def _mean(values: list[Any]) -> str:
    finite = finite_values(values)
    return as_number(statistics.mean(finite)) if finite else "n/a"


def report_command(sweep_dir: Path | str, records: list[dict[str, Any]], keys: list[str]) -> str:
    """The ``efficient-attn-report`` command for the full table of this sweep (every metric, ± 95% CI)."""
    choices = records[0].get("choices", {}) if records else {}
    rows = ["attention", *(f"choices.{k}" if k in choices else f"config.{k}" for k in keys)]
    return f"efficient-attn-report {sweep_dir} --rows {','.join(rows)} --ci"


def summary(sweep_dir: Path | str) -> str:
    """The text printed after a multirun: run count, the compact table, the failed jobs, the full-table command."""
    return summarize(sweep_dir)[0]


def summarize(sweep_dir: Path | str, launch: str | None = None) -> tuple[str, int]:
    """(the summary text, how many jobs failed or left no results.json, not counting jobs another live launch
    holds, nor, given this launch's id ``launch``, jobs this launch did not start last): the sweep's exit code
    follows the count."""
    records, failed, keys = load_sweep(Path(sweep_dir))
    header, body = compact_table(records, failed, keys)
    errors = [job for job in failed if job["error"] is not None]
    running = [job for job in failed if job["running"]]
    missing = len(failed) - len(errors) - len(running)
    counted = [job for job in failed if not job["running"]]
    ours = [job for job in counted if launch is None or job["launch"] == launch]
    count = f"{len(records)} run(s) in {sweep_dir}" + (f", {len(errors)} failed" if errors else "") + \
        (f", {missing} without results.json" if missing else "") + \
        (f", {len(running)} running in another launch" if running else "")
    lines = [count, markdown(header, body).rstrip(),
             "main metric: mean ± 95% CI over the row's runs (seeds), n of them (an accuracy in [0, 1]: mean [lo, hi], "
             "a bootstrap interval inside [0, 1]); tokens/s, peak MiB, wall s: means"]
    if errors:
        statuses = " or ".join(sorted({job["status"] for job in errors}))  # failed, interrupted
        lines.append(f"Failed jobs (results.json status {statuses}; ckpt_path=last with the same hydra.sweep.dir "
                     "runs them again):")
        lines += [f"  {job['dir']}: {job['error']}" for job in sorted(errors, key=_launch_order)]
    if len(ours) < len(counted):
        lines.append(f"{len(counted) - len(ours)} of the failed jobs or jobs without results.json "
                     "were not last started by this launch: they do not count in its exit code")
    lines.append(f"Full table (every metric): {report_command(sweep_dir, records, keys)}")
    return "\n".join(lines), len(ours)
