"""Reading run records for the report and the sweep summary: every run dir under some roots (a dir with
``.hydra/``) with its ``results.json`` (finished or failed) or without one, the config files Hydra picked for
it, and the fields and metric columns a table reads from a record.

Tables come from each run's ``results.json`` (efficient_attn_tasks/run/record.py writes it), never from W&B files. Importing
this module loads neither torch nor Lightning.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESOURCES = ("num_parameters", "steps", "skipped_updates", "train_tokens_per_s", "peak_memory_mib", "wall_time_s")


def find_runs(roots: list[Path]) -> tuple[list[dict[str, Any]], list[Path], list[dict[str, Any]]]:
    """(records of finished runs, run dirs without results.json, records of failed runs); a run dir is one with
    a .hydra/ folder. A record without ``status`` (written before the field existed) is a finished run."""
    records, missing, failed = [], [], []
    for root in roots:
        for hydra_dir in sorted(root.rglob(".hydra")):
            result = hydra_dir.parent / "results.json"
            if result.exists():
                record = json.loads(result.read_text())
                found = failed if record.get("status", "ok") == "failed" else records
                record.setdefault("row", (record.get("config") or {}).get("row"))  # the ablation row label
                choices, job = hydra_job(hydra_dir)
                # the attention config file (favor_plus, favor_trig), not the registry name (favor) they
                # share: the recorded attention_config, else (records before it existed) the group Hydra
                # picked, which a command-line attention.name=X does not change; per-layer runs keep their
                # recorded label (the layer configs joined by "+")
                per_layer = ((record.get("config") or {}).get("model") or {}).get("layer_attentions")
                if not per_layer:
                    label = record.get("attention_config") or choices.get("attention")
                    record["attention"] = label or record.get("attention")
                found.append({**record, "_dir": str(hydra_dir.parent), "_job": job, "choices": choices})
            else:
                missing.append(hydra_dir.parent)
    return records, missing, failed


def failure(record: dict[str, Any]) -> str:
    """A failed record's error as "Type: message"."""
    error = record.get("error") or {}
    return f"{error.get('type', 'error')}: {error.get('message', '')}"


def not_run_labels(missing: list[Path], failed: list[dict[str, Any]] | None) -> list[str]:
    """Labels of the rows under the table: each failed run (run dir, step reached, error; "|" escaped for
    Markdown), then each run dir without results.json."""
    labels = [f"{r['_dir']} (failed at step {r.get('steps', 0)}: {failure(r)})".replace("|", "\\|")
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


def metrics(record: dict[str, Any]) -> dict[str, float | None]:
    """Metric columns of one run: best val, last val metrics as "<key> (last)", test metrics, resources."""
    m = record["metrics"]
    last = {f"{k} (last)": v for k, v in sorted((m.get("val_last") or {}).items())}
    row = {f"val {m['monitor']} (best)": m["val_best"], **last, **dict(sorted(m["test"].items()))}
    return {**row, **{k: record[k] for k in RESOURCES if k in record}}  # older records lack some
