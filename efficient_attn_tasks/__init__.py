"""Lightning tasks (translation, listops, lm, mqar) and the command-line apps.

Installed as ``efficient_attn_tasks`` (the repository keeps the folder ``tasks/``; ``pyproject.toml`` maps
it), so no generic top-level name such as ``tasks`` is installed. Never imported by ``efficient_attn``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

# What ``pip install "efficient-attn[train]"`` adds to the core (torch, einops), by import name.
TRAIN_EXTRA = ("hydra", "omegaconf", "pytorch_lightning", "torchmetrics", "wandb", "sentencepiece", "sacrebleu",
               "scipy", "matplotlib")
_missing = [name for name in TRAIN_EXTRA if importlib.util.find_spec(name) is None]
if _missing:
    raise ImportError(f"the training and evaluation commands need the train extra ({', '.join(_missing)} not "
                      "installed): pip install \"efficient-attn[train]\"")


def config_dir() -> Path:
    """The Hydra config tree: ``configs/`` inside this package in a wheel, beside ``tasks/`` in the repo."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "configs", here.parent / "configs"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"no configs/train.yaml in {here} or {here.parent}: a broken install; reinstall "
                            "efficient-attn")
