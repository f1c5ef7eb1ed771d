"""Score a trained checkpoint (loaded by checkpoint.py) on a split of its run's data or on given files, and write
its JSON record.

Every split is scored the way the run scored its test split (translation: beam search from ``task.beam_size``),
with the same batches, so ``--split test`` on a run's best checkpoint reproduces its results.json test metrics.
"""

from __future__ import annotations

import argparse
import json
import re
import time
import warnings
from pathlib import Path
from typing import Any

from efficient_attn_tasks.commands.cli import wrote


def run(a: argparse.Namespace) -> dict[str, Any]:
    """Score, write the record (and the hypotheses), print the summary; returns the record."""
    import pytorch_lightning as pl

    from efficient_attn_tasks.config.labels import attention_label
    from efficient_attn_tasks.inference.checkpoint import ConfigError, load
    from efficient_attn_tasks.run.callbacks import quiet_lightning
    from efficient_attn_tasks.run.convert import parse_kwargs
    from efficient_attn_tasks.run.machine import hardware, versions

    start = time.perf_counter()
    quiet_lightning()
    # Lightning's own use of a torch API that torch deprecated (as in run/fit.py); nothing a user can act on
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    swap_kwargs = parse_kwargs(a.attention_kwargs or [])
    if swap_kwargs and not a.attention:
        raise ConfigError("--attention-kwargs changes the attention swapped in: give --attention NAME too")
    loaded = load(a.checkpoint, {"beam_size": a.beam, "batch_size": a.batch_size}, a.data_dir, a.cache_dir,
                  a.attention, swap_kwargs)
    cfg, module = loaded.cfg, loaded.module
    loader, data = _loader(loaded, a)
    precision = a.precision or cfg.trainer.get("precision") or "32-true"
    trainer = pl.Trainer(accelerator="gpu" if a.device == "cuda" else a.device, devices=1, precision=precision,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    metrics = trainer.test(module, dataloaders=loader, verbose=False)[0]
    label = a.split if not a.files else a.files[0].name
    out = a.out or loaded.path.with_name(f"{loaded.path.stem}.eval_{label}{swap_suffix(a.attention, swap_kwargs)}.json")
    hypotheses = getattr(module, "test_hypotheses", None)
    hyp_path = out.with_name(f"{out.stem}.hyp.txt") if hypotheses else None
    record = {
        "checkpoint": str(loaded.path.resolve()),
        "checkpoint_choice": loaded.chosen,
        "task": cfg.task.name,
        "attention": attention_label(cfg),
        "swapped_in": loaded.swap,  # --attention: the attention config swapped in, its kwargs, what was loaded
        "name": cfg.name,
        "seed": cfg.seed,
        "data": data,
        "examples": len(loader.dataset),
        "beam": cfg.task.beam_size if cfg.task.name == "translation" else None,
        "batch_size": cfg.task.batch_size,
        "precision": str(precision),
        "metrics": {key.split("/", 1)[1]: float(value) for key, value in metrics.items()},  # every split as test/...
        "bleu_signature": getattr(module, "bleu_signature", None),
        "hypotheses": str(hyp_path) if hyp_path else None,
        "wall_time_s": time.perf_counter() - start,
        "hardware": hardware(),
        "versions": versions(),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    if hyp_path:
        hyp_path.write_text("\n".join(hypotheses) + "\n")
    scores = " ".join(f"{k}={v:.4g}" for k, v in sorted(record["metrics"].items()))
    print(f"[{record['task']} / {record['attention']}] {label}: {scores} | {loaded.path}")
    wrote(out, *([hyp_path] if hyp_path else []))
    return record


def swap_suffix(attention: str | None, kwargs: dict[str, Any]) -> str:
    """The default record name's mark of a swap-in eval: ``.swap_<name>[.<key>=<value>...]`` (none without one)."""
    if attention is None:
        return ""
    parts = [f"swap_{attention}", *(f"{k}={v}" for k, v in sorted(kwargs.items()))]
    return "." + re.sub(r"[^\w.=+-]", "_", ".".join(parts))


def _loader(loaded: Any, a: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """(test loader, what it reads for the record): the run's ``--split``, or ``--files``."""
    from efficient_attn_tasks.inference.checkpoint import ConfigError

    task = loaded.cfg.task.name
    if not a.files:
        loaded.data.setup("test")
        return getattr(loaded.data, f"{a.split}_dataloader")(), {"split": a.split}
    missing = [str(f) for f in a.files if not f.is_file()]
    if missing:
        raise ConfigError(f"--files: no such file {', '.join(missing)}")
    wanted = {"translation": 2, "lm": 1}.get(task)
    if wanted is None:
        raise ConfigError(f"--files scores translation (SRC REF) and lm (TEXT) checkpoints; a {task} checkpoint "
                          "scores its run's own splits (--split val|test)")
    if len(a.files) != wanted:
        raise ConfigError(f"--files for a {task} checkpoint takes {'SRC REF' if wanted == 2 else 'TEXT'}, "
                          f"got {len(a.files)} file(s)")
    loader = _translation_files(loaded, *a.files) if task == "translation" else _lm_file(loaded, a.files[0])
    return loader, {"files": [str(f.resolve()) for f in a.files]}


def _translation_files(loaded: Any, src_path: Path, ref_path: Path) -> Any:
    """Parallel source and reference files, in order, batched as the run's test split."""
    from efficient_attn_tasks.inference.checkpoint import ConfigError, check_lengths
    from efficient_attn_tasks.tasks.data import read_lines
    from efficient_attn_tasks.tasks.sampling import sharded_eval_loader
    from efficient_attn_tasks.tasks.translation_data import collate_indexed

    src, ref = read_lines(src_path), read_lines(ref_path)
    if len(src) != len(ref) or not src:
        raise ConfigError(f"--files: {src_path} has {len(src)} lines and {ref_path} {len(ref)}; they must be "
                          "parallel, one sentence per line, and not empty")
    sp, limit = loaded.module.sp, loaded.module.model.cfg.max_len
    src_ids, ref_ids = sp.encode(src), sp.encode(ref)
    check_lengths(src_ids, limit, str(src_path))
    check_lengths(ref_ids, limit - 1, str(ref_path))  # + BOS or EOS when scored
    rows = list(zip(src_ids, ref_ids, ref))
    return sharded_eval_loader(rows, loaded.cfg.task.batch_size, None, collate_fn=collate_indexed)  # one process


def _lm_file(loaded: Any, path: Path) -> Any:
    """A UTF-8 file in contiguous windows of the run's context length (all of it, whatever task.eval_batches)."""
    from efficient_attn_tasks.inference.checkpoint import ConfigError
    from efficient_attn_tasks.tasks import lm
    from efficient_attn_tasks.tasks.sampling import eval_loader

    data = lm.read_bytes(lm.Config(dataset="file", path=str(path)), path)
    length = loaded.cfg.task.context_length
    if len(data) < length + 1:
        raise ConfigError(f"--files {path} has {len(data)} bytes, fewer than one window of the run's "
                          f"task.context_length + 1 = {length + 1}")
    return eval_loader(lm.eval_windows(data, length, None), loaded.cfg.task.batch_size)
