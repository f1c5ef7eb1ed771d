"""Reading run records for the report and the sweep summary: every run dir under some roots (a dir with
``.hydra/``), with its ``results.json`` (finished or failed) or without one, and the config files Hydra picked.

A table row is the run's :class:`~efficient_attn_tasks.run.record.RunRecord` as a dict (``to_dict``) plus
what the run dir adds (``row``, ``_dir``, ``_job``, ``choices``); this module also reads the fields and metric
columns of a row. Importing it loads neither torch nor Lightning.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from efficient_attn_tasks.run.record import RESULTS_JSON, RunRecord

RESOURCES = ("num_parameters", "steps", "skipped_updates", "train_tokens_per_s", "peak_memory_mib", "wall_time_s")


def find_runs(roots: list[Path]) -> tuple[list[dict[str, Any]], list[Path], list[dict[str, Any]]]:
    """(records of finished runs, run dirs without results.json, records of failed or interrupted runs); a run
    dir is one with a .hydra/ folder."""
    records, missing, failed = [], [], []
    for root in roots:
        for hydra_dir in sorted(root.rglob(".hydra")):
            result = hydra_dir.parent / RESULTS_JSON
            if not result.exists():
                missing.append(hydra_dir.parent)
                continue
            record = RunRecord.read(result)
            row = record.to_dict()
            row.setdefault("row", record.config.get("row"))  # the ablation row label
            choices, job = hydra_job(hydra_dir)
            # the attention config file (favor_plus, favor_trig), not the registry name (favor) they
            # share: the recorded attention_config, else (format 1 records) the group Hydra picked,
            # which a command-line attention.name=X does not change; per-layer runs keep their
            # recorded label (the layer configs joined by "+")
            if not (record.config.get("model") or {}).get("layer_attentions"):
                row["attention"] = record.attention_config or choices.get("attention") or record.attention
            (failed if record.stopped else records).append({**row, "_dir": str(hydra_dir.parent), "_job": job,
                                                           "choices": choices})
    return records, missing, failed


def failure(record: dict[str, Any]) -> str:
    """A failed or interrupted record's error as "Type: message"."""
    return f"{record['error']['type']}: {record['error']['message']}"


def not_run_labels(missing: list[Path], failed: list[dict[str, Any]] | None) -> list[str]:
    """Labels of the rows under the table: each failed or interrupted run (run dir, status, step reached, error;
    "|" escaped for Markdown), then each run dir without results.json."""
    labels = [f"{r['_dir']} ({r['status']} at step {r['steps']}: {failure(r)})".replace("|", "\\|")
              for r in failed or []]
    return labels + [f"{path} (missing results.json)" for path in missing]


def hydra_job(hydra_dir: Path) -> tuple[dict[str, str], int | None]:
    """(the config files the run picked per group, its job number in the sweep) from ``.hydra/hydra.yaml``:
    ``choices["attention"]`` = ``favor_plus``, not ``favor``; the number orders jobs as they were launched.
    ({}, None) when the file is missing or unreadable."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        hydra = OmegaConf.load(hydra_dir / "hydra.yaml").get("hydra") or {}
    except (OSError, OmegaConfBaseException):
        return {}, None
    choices = (hydra.get("runtime") or {}).get("choices") or {}
    return dict(choices), (hydra.get("job") or {}).get("num")


def field(record: dict[str, Any], key: str) -> Any:
    """A record field, or ``config.a.b`` for a resolved config value."""
    value: Any = record
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def parse_defaults(items: list[str] | None) -> dict[str, Any]:
    """``["config.transfer_steps=0"]`` -> {"config.transfer_steps": 0}: ints and floats as numbers, else text."""
    defaults: dict[str, Any] = {}
    for text in items or []:
        key, sep, raw = text.partition("=")
        if not sep or not key.startswith("config.") or not raw:
            raise SystemExit(f"--default {text!r}: expected config.<dotted.key>=VALUE, e.g. config.transfer_steps=0")
        defaults[key] = parse_number(raw)
    return defaults


def parse_number(text: str) -> Any:
    """"3" -> 3, "0.5" -> 0.5, "inf" -> inf; other text as it is."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def fill_defaults(records: list[dict[str, Any]], defaults: dict[str, Any]) -> None:
    """Give each record without ``config.a.b`` (written before the key existed) the value ``defaults`` names;
    a record that has the key, null included, keeps its own."""
    for key, value in defaults.items():
        *path, last = key.split(".")
        for record in records:
            if has_field(record, key):
                continue
            node: Any = record
            for part in path:
                node = node.setdefault(part, {}) if isinstance(node, dict) else None
            if isinstance(node, dict):  # a section the record has as a value keeps that value
                node[last] = value


def has_field(record: dict[str, Any], key: str) -> bool:
    """Whether ``key`` (``config.a.b``) is in the record, whatever its value (null included)."""
    value: Any = record
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return False
        value = value[part]
    return True


def unknown_field(records: list[dict[str, Any]], key: str) -> str | None:
    """None when some record has ``key``; else why not, naming the longest part of it that a record has."""
    if not records or any(has_field(r, key) for r in records):
        return None
    parts = key.split(".")
    for n in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:n])
        holders = [r for r in records if has_field(r, prefix)]
        if holders:
            found = field(holders[0], prefix)
            if isinstance(found, dict):
                return f"no run record has {key}; {prefix} has {sorted(found)}"
            return f"no run record has {key}; {prefix} is a value ({found!r}), not a section"
    return f"no run record has {key}"


def best_column(monitor: str) -> str:
    """The column of the monitored metric's best validation value: ``val/bleu (best)``."""
    return f"{monitor} (best)"


def column_name(name: str) -> str:
    """A metric column as the user wrote it, with the spelling ``val val/bleu (best)`` read as ``val/bleu (best)``."""
    return name[len("val "):] if name.startswith("val ") and name.endswith(" (best)") else name


def metrics(record: dict[str, Any]) -> dict[str, float | None]:
    """Metric columns of one run: the monitor's best val as "<monitor> (best)", last val metrics as "<key> (last)",
    test metrics, and the resources the record has (not null)."""
    m = record["metrics"]
    last = {f"{k} (last)": v for k, v in sorted(m["val_last"].items())}
    row = {best_column(m["monitor"]): m["val_best"], **last, **dict(sorted(m["test"].items()))}
    return {**row, **{k: record[k] for k in RESOURCES if record.get(k) is not None}}
