"""The names a run's attention goes by: in run dirs, W&B, results.json, reports and error messages.

:func:`attention_label` (results.json ``attention``), :func:`attention_config` (``attention_config``, run dirs,
W&B tags), :func:`config_label` (one attention config's label; the ``${attention_label:name,config}``
resolver of configs/train.yaml, registered when this module loads) and :func:`drop_stale_config`
(check_config's fix of a label a command-line ``attention.name`` made wrong). Loads neither torch nor Lightning.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from efficient_attn_tasks.config.schema import ATTENTION_CONFIG_DIR

SECTIONS = ("attention", "model.encoder_attention", "model.decoder_attention", "model.cross_attention")


def attention_label(cfg: DictConfig) -> str:
    """The attention's name in results rows: ``attention.name`` (``based`` for the hybrid config), or
    the ``model.layer_attentions`` entries (config names, or ``{name, kwargs}``'s name) joined by ``+``."""
    per_layer = cfg.model.get("layer_attentions")
    if per_layer is None:
        return str(cfg.attention.name)
    entries = OmegaConf.to_container(per_layer, resolve=True) if OmegaConf.is_config(per_layer) else per_layer
    return "+".join(e if isinstance(e, str) else str(e.get("name")) for e in entries)


def attention_config(cfg: DictConfig) -> str:
    """The attention config a run used: ``attention.config`` (the file's name: ``favor_relu`` where
    ``attention.name`` is ``favor``), else ``attention.name``; with ``model.layer_attentions`` set,
    :func:`attention_label` (those entries joined by ``+``)."""
    if cfg.model.get("layer_attentions") is not None:
        return attention_label(cfg)
    return str(cfg.attention.get("config") or cfg.attention.name)


def config_label(name: str, config: str | None) -> str:
    """One attention's label: its config file's name (``favor_relu`` for ``name: favor``), unless a
    command-line ``attention.name=X`` replaced the file's attention (then ``X``)."""
    if not config:
        return str(name)
    path = ATTENTION_CONFIG_DIR / f"{config}.yaml"
    named = OmegaConf.load(path).get("name") if path.is_file() else None
    return str(name) if named is not None and named != name else str(config)


def drop_stale_config(cfg: DictConfig) -> None:
    """Clear each attention section's ``config`` that names another attention than its ``name``: a command-line
    ``attention.name=X`` over the default ``attention=softmax`` keeps that file's ``config: softmax``, so the
    label would name softmax; it is ``X`` then."""
    for key in SECTIONS:
        node: Any = OmegaConf.select(cfg, key)
        if isinstance(node, DictConfig) and node.get("config") and node.get("layers") is None:
            if config_label(node.get("name"), node.config) != node.config:
                node.config = None


# hydra.run.dir / hydra.sweep.subdir use it; Hydra resolves them before the job starts
OmegaConf.register_new_resolver("attention_label", config_label, replace=True)
