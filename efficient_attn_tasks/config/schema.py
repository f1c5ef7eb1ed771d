"""The schemas of the run config's shared sections, and what the attention sections resolve to.

The optimiser, attention and model sections as dataclasses (a task's ``task:`` section is its module's
``Config``); :func:`attention_spec`, the attention(s) a model site gets, one per layer for hybrids; and
:func:`check_attentions`, the one check of those attentions for the sites a task's model has. Importing it
loads neither torch nor Lightning; the model section and the attention specs load torch when first used.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

from omegaconf import DictConfig, OmegaConf

from efficient_attn_tasks import config_dir

if TYPE_CHECKING:
    from efficient_attn.transformer import AttentionSpec, TransformerConfig

SITES = ("encoder", "decoder", "cross")  # the attention sites of the models (efficient_attn.transformer.SITE_USE)
SCHEDULES = ("inverse_sqrt", "cosine", "constant")  # efficient_attn_tasks/tasks/base.py TaskModule._lr_factor


@functools.lru_cache(maxsize=1)
def _model_config() -> type:
    from efficient_attn.transformer import TransformerConfig

    @dataclass
    class ModelConfig(TransformerConfig):
        """Architecture plus optional per-site attention overrides (null = the top-level ``attention``)
        and ``layer_attentions``: one attention per self-attention layer (see :func:`attention_spec`)."""

        encoder_attention: Any = None
        decoder_attention: Any = None
        cross_attention: Any = None
        layer_attentions: Any = None

    ModelConfig.__qualname__ = "ModelConfig"
    return ModelConfig


def __getattr__(name: str) -> Any:
    """``ModelConfig`` extends torch-backed ``TransformerConfig``: built on first use, so the
    optimiser, trainer and logger sections are checked before torch loads."""
    if name == "ModelConfig":
        return _model_config()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class OptimConfig:
    lr: float = 5e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int = 1000
    schedule: str = "inverse_sqrt"  # inverse_sqrt (Vaswani et al.) | cosine | constant
    total_steps: int | None = None  # cosine's horizon; None = the trainer's (max_steps, or max_epochs x batches)

    def __post_init__(self) -> None:
        if not _real(self.lr) or self.lr <= 0:
            raise ValueError(f"optim.lr must be a number > 0, got {self.lr!r}; e.g. optim.lr=5e-4")
        if not _real(self.weight_decay) or self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay must be a number >= 0 (0: none), got {self.weight_decay!r}")
        betas = list(self.betas) if isinstance(self.betas, (list, tuple)) else None
        if betas is None or len(betas) != 2 or not all(_real(b) and 0 <= b < 1 for b in betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {self.betas!r}; "
                             "e.g. optim.betas=[0.9,0.98]")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule must be one of {list(SCHEDULES)}, got {self.schedule!r}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be an int >= 0, got {self.warmup_steps!r}")
        if self.total_steps is not None and (not isinstance(self.total_steps, int) or self.total_steps < 1):
            raise ValueError(f"optim.total_steps must be null or an int >= 1, got {self.total_steps!r}")


def _real(value: Any) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class AttentionConfig:
    """One registered attention (``name``, ``kwargs``), or a per-layer hybrid: ``layers`` a list of
    attentions (``{name, kwargs}`` or attention config names), a pattern tiled over each
    self-attention stack; ``name`` is then only the label (e.g. ``based``) and ``kwargs`` empty.
    ``config``: the name of the attention config file (``configs/attention/<config>.yaml`` sets it to its
    own name), which tells apart variants of one registered attention (favor_plus, favor_relu: ``favor``).
    ``layer``: the layer options of ``MultiHeadAttention`` (:data:`LAYER_DEFAULTS`' keys; every single-attention
    config file spells them out, so ``attention.layer.short_conv=4`` overrides any of them)."""

    name: str = "softmax"
    config: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    layers: Any = None
    layer: Any = None


# MultiHeadAttention's layer options and their defaults (efficient_attn.multihead.LAYER_OPTIONS): off
LAYER_DEFAULTS: dict[str, Any] = {"short_conv": 0, "output_norm": None, "output_gate": False}


def layer_options(node: Any) -> dict[str, Any]:
    """An attention section's ``layer`` mapping without the options at their defaults (``{}``: the plain layer);
    unknown keys are kept, so :meth:`AttentionSpec.check` names them."""
    layer = _container(node.get("layer")) if isinstance(node, dict) or OmegaConf.is_config(node) else None
    if layer is None:
        return {}
    if not isinstance(layer, dict):
        raise ValueError(f"an attention's layer must be a mapping of layer options {sorted(LAYER_DEFAULTS)}, "
                         f"got {layer!r}")
    return {k: v for k, v in layer.items() if k not in LAYER_DEFAULTS or v != LAYER_DEFAULTS[k]}


ATTENTION_CONFIG_DIR = config_dir() / "attention"  # the CLI's group
_ENTRY_KEYS = {"name", "kwargs", "layer"}


def model_max_len(cfg: DictConfig) -> int:
    """``model.max_len``; null (the task's longest sequence) is filled in by :func:`.checks.check_config`."""
    if cfg.model.get("max_len") is None:
        raise ValueError("model.max_len is null (the task's longest sequence): run "
                         "efficient_attn_tasks.config.checks.check_config(cfg) first, which fills it in, "
                         "or set model.max_len")
    return int(cfg.model.max_len)


def transformer_config(cfg: DictConfig) -> TransformerConfig:
    from efficient_attn.transformer import TransformerConfig

    model_max_len(cfg)
    model = OmegaConf.to_container(cfg.model, resolve=True)
    fields = {k: v for k, v in model.items() if not k.endswith("_attention") and k != "layer_attentions"}
    return TransformerConfig(**fields)


def attention_spec(cfg: DictConfig, site: str) -> AttentionSpec | list[AttentionSpec]:
    """The attention for one site (``encoder``, ``decoder`` or ``cross``): one spec, or one per layer.

    First match wins: ``model.<site>_attention``; for self-attention sites ``model.layer_attentions``
    (exactly one entry per layer of the site's stack; translation: encoder and decoder alike);
    ``attention``. An attention with ``layers`` (a hybrid, ``attention=based``) has its pattern
    tiled over the stack: layer i uses ``layers[i % len(layers)]``. Entries are attention config
    names (``configs/attention/<name>.yaml``, its kwargs applied) or ``{name, kwargs}``; so is
    ``model.<site>_attention``. Cross-attention takes one attention: a hybrid there is a ``ValueError``
    saying what to set.
    """
    from efficient_attn.transformer import AttentionSpec

    override = cfg.model.get(f"{site}_attention")
    per_layer = cfg.model.get("layer_attentions")
    if not override and per_layer is not None and site != "cross":
        entries = _entries(per_layer, "model.layer_attentions")
        count = num_layers(cfg, site)
        if len(entries) != count:
            raise ValueError(
                f"model.layer_attentions has {len(entries)} entries but the {site} has {count} layers "
                f"(model.{site}_layers); give exactly one attention per layer"
            )
        return [layer_entry(e, f"model.layer_attentions[{i}]") for i, e in enumerate(entries)]
    where = f"model.{site}_attention" if override else "attention"
    if isinstance(override, str):  # a config name: configs/attention/<name>.yaml
        return layer_entry(override, where)
    node = _container(override or cfg.attention)
    if not isinstance(node, dict):
        raise ValueError(f"{where} must be {{name, kwargs}}, got {node!r}")
    if node.get("layers") is None:
        return AttentionSpec(node["name"], dict(node.get("kwargs") or {}), layer_options(node))
    if layer_options(node):
        raise ValueError(f"{where}: a per-layer hybrid ({node['name']!r}) takes no layer options of its own; "
                         f"set each layer's in {where}.layers (layer: {{...}})")
    pattern = _entries(node["layers"], f"{where}.layers")
    if not pattern:
        raise ValueError(f"{where}.layers is empty; give at least one attention, or null for a single attention")
    if node.get("kwargs"):
        raise ValueError(f"{where}: a per-layer hybrid ({node['name']!r}) takes no kwargs of its own; "
                         f"set each layer's kwargs in {where}.layers")
    if site == "cross":
        raise ValueError(
            f"{where} {node['name']!r} is a per-layer hybrid of self-attentions; cross-attention takes one "
            "attention: set model.cross_attention, e.g. ++model.cross_attention={name: softmax, kwargs: {}}"
        )
    specs = [layer_entry(e, f"{where}.layers[{i}]") for i, e in enumerate(pattern)]
    return [specs[i % len(specs)] for i in range(num_layers(cfg, site))]


def layer_entry(entry: Any, where: str) -> AttentionSpec:
    """One layer's attention: a config name (``configs/attention/<name>.yaml``) or ``{name, kwargs}``."""
    from efficient_attn.transformer import AttentionSpec

    if isinstance(entry, str):
        path = ATTENTION_CONFIG_DIR / f"{entry}.yaml"
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", entry) or not path.is_file():
            raise ValueError(
                f"{where}: unknown attention config {entry!r}; choose one of {attention_config_names()} "
                "(configs/attention/), or give {name: <registered attention>, kwargs: {...}}"
            )
        node = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    elif isinstance(entry, dict):
        node = entry
        unknown = sorted(set(node) - _ENTRY_KEYS - {"layers"})
        if unknown or "name" not in node:
            raise ValueError(f"{where}: a layer's attention is {{name, kwargs, layer}}, got keys {sorted(node)}")
    else:
        raise ValueError(f"{where}: expected an attention config name or {{name, kwargs}}, got {entry!r}")
    if node.get("layers") is not None:
        raise ValueError(f"{where}: {node.get('name')!r} is itself a per-layer hybrid; a layer takes one attention")
    return AttentionSpec(node["name"], dict(node.get("kwargs") or {}), layer_options(node))


def check_attentions(cfg: DictConfig, sites: Sequence[str]) -> None:
    """Every attention the model of a task with ``sites`` gets: ``ValueError`` or ``TypeError`` naming the
    site (and layer) and what to change.

    A site of the model: its attention(s) as :func:`attention_spec` resolves them, every layer checked for
    that site by :func:`efficient_attn.transformer.layer_specs`, the check the model runs when it is built.
    Another site: its attention (``model.<site>_attention``, else ``attention``) must still exist and take
    its options. ``causal`` is no option anywhere: the model sets it per site.
    """
    from efficient_attn.transformer import AttentionSpec, layer_specs

    for site in SITES:
        where = f"{site} attention"
        if site not in sites:
            node = cfg.model.get(f"{site}_attention") or cfg.attention
            node = node if isinstance(node, str) else _container(node)  # a str: a config name
            if isinstance(node, str) or node.get("layers") is None:  # a hybrid's layers are checked where it serves
                spec = (layer_entry(node, f"model.{site}_attention") if isinstance(node, str) else
                        AttentionSpec(node["name"], dict(node.get("kwargs") or {}), layer_options(node)))
                _refuse_causal(spec, where)
                spec.check(where)
            continue
        specs = attention_spec(cfg, site)
        per_layer = not isinstance(specs, AttentionSpec)
        for i, spec in enumerate(specs if per_layer else [specs]):
            _refuse_causal(spec, f"{where}, layer {i}" if per_layer else where)
        try:
            layer_specs(specs, num_layers(cfg, site), where, site)
        except ValueError as err:
            fix = ("choose another attention for that layer (model.layer_attentions or the hybrid's attention.layers)"
                   if per_layer else f"choose another attention for this site, e.g. "
                   f"++model.{site}_attention={{name: softmax, kwargs: {{}}}}")
            raise ValueError(f"{err}; {fix}") from None


def attention_config_names() -> list[str]:
    """The single-attention configs a layer can name (``configs/attention/*.yaml`` without ``layers``)."""
    paths = sorted(ATTENTION_CONFIG_DIR.glob("*.yaml"))
    return [p.stem for p in paths if OmegaConf.load(p).get("layers") is None]


def num_layers(cfg: DictConfig, site: str) -> int:
    """Layers of the stack that holds ``site`` (cross-attention: the decoder's)."""
    return int(cfg.model.get(f"{'decoder' if site == 'cross' else site}_layers"))


def _refuse_causal(spec: AttentionSpec, where: str) -> None:
    if "causal" in spec.kwargs:
        raise ValueError(f"{where}: causal is not an attention option; the model sets it per site (decoder "
                         "self-attention is causal, encoder and cross-attention are not); remove it")


def _container(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def _entries(node: Any, where: str) -> list[Any]:
    value = _container(node)
    if not isinstance(value, list):
        raise ValueError(f"{where} must be a list of attentions, got {value!r}")
    return value
