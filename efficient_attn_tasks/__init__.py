"""The application of efficient-attn: Lightning tasks (translation, listops, lm, mqar), their Hydra configs, the
command-line apps, reports and benchmarks.

Needs the ``train`` extra (checked on import, with the install command: one line from a console command, an
ImportError from Python); ``efficient_attn`` never imports it.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

# How long an idle OpenMP thread spins before it sleeps, set before torch loads OpenMP: libgomp's own 300,000
# spins (~3 ms) hold the cores that other processes need (the quickstart 19x slower beside one CPU-bound process),
# 0 (OMP_WAIT_POLICY=PASSIVE) costs it ~17% idle; 1,000 keeps both small (results/benchmarks/contention/).
# A user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT wins.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = "1000"

# What ``pip install "efficient-attn[train]"`` adds to the core (torch, einops), by import name.
TRAIN_EXTRA = ("hydra", "omegaconf", "pytorch_lightning", "torchmetrics", "wandb", "sentencepiece", "sacrebleu",
               "scipy", "matplotlib")
_missing = [name for name in TRAIN_EXTRA if importlib.util.find_spec(name) is None]
if _missing:
    _message = (f"the training and evaluation commands need the train extra ({', '.join(_missing)} not installed): "
                "pip install \"efficient-attn[train]\"")
    # a console command (efficient-attn-train, ...) or ``python -m efficient_attn_tasks...`` (argv[0] is "-m" while
    # the module is found): one line and exit status 2; an import from Python: the ImportError
    if Path(sys.argv[0] if sys.argv else "").name.startswith("efficient-attn-") or sys.argv[:1] == ["-m"]:
        sys.stderr.write(f"error: {_message}\n")
        raise SystemExit(2)
    raise ImportError(_message)


def config_dir() -> Path:
    """The Hydra config tree: ``configs/`` inside this package in a wheel, beside it in a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "configs", here.parent / "configs"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"no configs/train.yaml in {here} or {here.parent}: a broken install; reinstall "
                            "efficient-attn")
