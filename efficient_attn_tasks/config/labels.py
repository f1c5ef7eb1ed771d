"""The names a run's attention goes by: in run dirs, W&B, results.json, reports and error messages.

:func:`attention_label` (results.json ``attention``), :func:`attention_config` (``attention_config``, run dirs,
W&B tags), :func:`config_label` (one attention config's label; the ``${attention_label:name,config,layer}``
resolver of configs/train.yaml, registered when this module loads) and :func:`drop_stale_config`
(check_config's fix of a label a command-line ``attention.name`` made wrong). Loads neither torch nor Lightning.

Layer options that differ from the attention config file's own (``attention.layer.short_conv=4`` on gla)
append to the label: ``gla+conv4``, ``+rmsnorm``/``+groupnorm``/``+nonorm``, ``+gate``/``+nogate``
(:func:`layer_suffix`); a run with its file's layer options keeps the file's label (``retnet``).
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from efficient_attn_tasks.config.schema import ATTENTION_CONFIG_DIR, LAYER_DEFAULTS, layer_options

SECTIONS = ("attention", "model.encoder_attention", "model.decoder_attention", "model.cross_attention")


def attention_label(cfg: DictConfig) -> str:
    """The attention's name in results rows: ``attention.name`` (``based`` for the hybrid config), or
    the ``model.layer_attentions`` entries (config names, or ``{name, kwargs}``'s name) joined by ``+``."""
    per_layer = cfg.model.get("layer_attentions")
    if per_layer is None:
        return str(cfg.attention.name) + layer_suffix(cfg.attention.get("layer"), cfg.attention.get("config"))
    entries = OmegaConf.to_container(per_layer, resolve=True) if OmegaConf.is_config(per_layer) else per_layer
    return "+".join(e if isinstance(e, str) else str(e.get("name")) for e in entries)


def attention_config(cfg: DictConfig) -> str:
    """The attention config a run used: ``attention.config`` (the file's name: ``favor_relu`` where
    ``attention.name`` is ``favor``), else ``attention.name``; with ``model.layer_attentions`` set,
    :func:`attention_label` (those entries joined by ``+``)."""
    if cfg.model.get("layer_attentions") is not None:
        return attention_label(cfg)
    suffix = layer_suffix(cfg.attention.get("layer"), cfg.attention.get("config"))
    return str(cfg.attention.get("config") or cfg.attention.name) + suffix


def config_label(name: str, config: str | None, layer: Any = None) -> str:
    """One attention's label: its config file's name (``favor_relu`` for ``name: favor``), unless a
    command-line ``attention.name=X`` replaced the file's attention (then ``X``); then :func:`layer_suffix`."""
    if not config or _names_another(name, config):
        return str(name) + layer_suffix(layer, None)
    return str(config) + layer_suffix(layer, config)


def _names_another(name: str, config: str) -> bool:
    """configs/attention/<config>.yaml exists and names another attention than ``name``."""
    path = ATTENTION_CONFIG_DIR / f"{config}.yaml"
    named = OmegaConf.load(path).get("name") if path.is_file() else None
    return named is not None and named != name


def layer_suffix(layer: Any, config: str | None) -> str:
    """The layer options that differ from those of configs/attention/<config>.yaml (none: the defaults),
    as a label suffix: ``+conv4``, ``+rmsnorm``, ``+gate`` ...; ``""`` when they are the file's."""
    options = layer_options({"layer": layer})
    path = ATTENTION_CONFIG_DIR / f"{config}.yaml" if config else None
    base = layer_options(OmegaConf.load(path)) if path is not None and path.is_file() else {}
    parts = []
    order = list(LAYER_DEFAULTS)
    for key in sorted(set(options) | set(base), key=lambda k: (order.index(k) if k in order else len(order), k)):
        value = options.get(key, LAYER_DEFAULTS.get(key))
        if value == base.get(key, LAYER_DEFAULTS.get(key)):
            continue
        if key == "short_conv":
            parts.append(f"conv{value}")
        elif key == "output_norm":
            parts.append(str(value) if value else "nonorm")
        elif key == "output_gate":
            parts.append("gate" if value else "nogate")
        else:
            parts.append(f"{key}={value}")
    return "".join(f"+{p}" for p in parts)


def drop_stale_config(cfg: DictConfig) -> None:
    """Clear each attention section's ``config`` that names another attention than its ``name``: a command-line
    ``attention.name=X`` over the default ``attention=softmax`` keeps that file's ``config: softmax``, so the
    label would name softmax; it is ``X`` then."""
    for key in SECTIONS:
        node: Any = OmegaConf.select(cfg, key)
        if isinstance(node, DictConfig) and node.get("config") and node.get("layers") is None:
            if _names_another(node.get("name"), node.config):
                node.config = None


# hydra.run.dir / hydra.sweep.subdir use it; Hydra resolves them before the job starts
OmegaConf.register_new_resolver("attention_label", config_label, replace=True)
