"""Convert a trained model to another attention: load a checkpoint's weights into a model built with another one.

Every variant shares the weights outside its attention cores (embeddings, feed-forward, norms, output layer,
and each :class:`~efficient_attn.multihead.MultiHeadAttention`'s Q/K/V/O projections), under the same names
and shapes. What an attention owns is found structurally: the state of a ``MultiHeadAttention`` other than
its four projections, i.e. its core ``attention`` module and its layer options (short convolution, output
norm, output gate). :func:`load_converted` loads every shared weight of the checkpoint and keeps the new
attention's own tensors fresh (drawn from the run's seed: FAVOR+'s features, Hedgehog's maps); only when the
checkpoint's attentions are the new model's (same names, kwargs and layer options at every site) are those
loaded too. Two entry points use it: ``efficient-attn-train init_from=<run or .ckpt>`` (run/fit.py) and
``efficient-attn-eval RUN --attention NAME`` (inference/checkpoint.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from efficient_attn.multihead import MultiHeadAttention
from efficient_attn_tasks.config.checks import ConfigError
from efficient_attn_tasks.config.schema import ATTENTION_CONFIG_DIR, SITES, attention_spec, check_attentions

if TYPE_CHECKING:
    from efficient_attn_tasks.inference.checkpoint import Source

SHARED_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")  # what every variant's layer has
SHOWN = 5  # names shown in a refusal or in the log line


@dataclass
class Transfer:
    """What :func:`load_converted` did, by state-dict key: loaded from the checkpoint, kept fresh (the new
    attention's own), dropped (the checkpoint's attention's own, with no place in the new model)."""

    loaded: list[str] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    def line(self, source: Path | str) -> str:
        """One log line: the counts, and the fresh tensors' names (layer numbers as ``*``)."""
        fresh = f" ({', '.join(layer_patterns(self.fresh))})" if self.fresh else ""
        return (f"init from {source}: loaded {len(self.loaded)} tensors, kept {len(self.fresh)} of the new "
                f"attention fresh{fresh}, dropped {len(self.dropped)} of the checkpoint's attention")

    def to_dict(self) -> dict[str, Any]:
        return {"loaded": len(self.loaded), "fresh": self.fresh, "dropped": self.dropped}


def attention_owned(module: nn.Module) -> tuple[set[str], list[str]]:
    """(state-dict keys of ``module`` that attentions own, the prefixes ``<name>.`` of its MultiHeadAttentions):
    each MultiHeadAttention's state apart from its Q/K/V/O projections (its core and layer options)."""
    owned: set[str] = set()
    prefixes = []
    for name, mha in module.named_modules():
        if isinstance(mha, MultiHeadAttention):
            prefix = f"{name}." if name else ""
            prefixes.append(prefix)
            owned.update(prefix + key for key in mha.state_dict() if not _shared(key))
    return owned, prefixes


def load_converted(module: nn.Module, state: Mapping[str, torch.Tensor], same_attention: bool) -> Transfer:
    """Load ``state`` (a checkpoint's ``state_dict``) into ``module``, built with another attention.

    Loaded: every tensor of ``module`` that ``state`` holds with the same shape, except the attentions' own
    (unless ``same_attention``: the checkpoint's attentions are ``module``'s). Kept fresh: the attentions' own
    tensors. Dropped: the checkpoint's attention-owned tensors with no place in ``module``. Anything else is a
    :class:`ConfigError` naming it: a shared weight of another shape (d_model, vocabulary, heads differ), a
    shared weight the checkpoint lacks, a checkpoint weight that is no attention's and has no place here.
    """
    new = module.state_dict()
    owned, prefixes = attention_owned(module)
    done = Transfer()
    for key, tensor in new.items():
        if key in owned and not same_attention:
            done.fresh.append(key)
        elif key in state and state[key].shape == tensor.shape:
            done.loaded.append(key)
        elif key in owned and key not in state:
            done.fresh.append(key)
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(new[k].shape)}" for k in new
              if k in state and k not in done.fresh and state[k].shape != new[k].shape]
    if shapes:
        raise ConfigError(f"the checkpoint's weights do not fit this model: {_names(shapes)} (checkpoint vs model); "
                          "build the model as the checkpoint's (model.d_model, model.num_heads, layers, task "
                          "vocabulary) and change only the attention")
    missing = [k for k in new if k not in state and k not in done.fresh]
    if missing:
        raise ConfigError(f"the checkpoint lacks weights of this model that no attention owns: {_names(missing)}; "
                          "build the model as the checkpoint's (layers, model options) and change only the attention")
    extra = [k for k in state if k not in new]
    done.dropped = [k for k in extra if any(k.startswith(p) and not _shared(k[len(p):]) for p in prefixes)]
    foreign = [k for k in extra if k not in done.dropped]
    if foreign:
        raise ConfigError(f"the checkpoint holds weights that are no attention's and have no place in this model: "
                          f"{_names(foreign)}; build the model as the checkpoint's and change only the attention")
    module.load_state_dict({**new, **{k: state[k] for k in done.loaded}})
    return done


def same_attentions(old: DictConfig, new: DictConfig, sites: Sequence[str]) -> bool:
    """Whether two run configs give every attention site of their task the same attention(s): names, kwargs
    and layer options (a hybrid: layer by layer)."""
    try:
        return all(attention_spec(old, s) == attention_spec(new, s) for s in sites)
    except (TypeError, ValueError):  # a checkpoint's attention this code cannot resolve: not the same
        return False


def init_from(module: nn.Module, source: Source, cfg: DictConfig, sites: Sequence[str]) -> Transfer:
    """:func:`load_converted` of ``source`` into ``module`` (built from ``cfg``), and its line printed."""
    done = load_converted(module, source.checkpoint["state_dict"], same_attentions(source.cfg, cfg, sites))
    print(done.line(f"{source.path} ({source.chosen})"))
    return done


def swap_attention(cfg: DictConfig, name: str, kwargs: Mapping[str, Any], sites: Sequence[str]) -> DictConfig:
    """A copy of a run's config whose every attention site uses attention config ``name``
    (configs/attention/<name>.yaml, as ``attention=<name>`` in training: its kwargs and layer options), its
    kwargs updated by ``kwargs``; a name or kwarg that does not exist is a :class:`ConfigError`."""
    path = ATTENTION_CONFIG_DIR / f"{name}.yaml"
    if not path.is_file() or path.parent != ATTENTION_CONFIG_DIR:
        names = sorted(p.stem for p in ATTENTION_CONFIG_DIR.glob("*.yaml"))
        raise ConfigError(f"--attention {name}: no attention config {name!r}; choose one of {names} "
                          "(configs/attention/)")
    node = OmegaConf.load(path)
    if kwargs and node.get("layers") is not None:
        raise ConfigError(f"--attention-kwargs: {name} is a per-layer hybrid with no kwargs of its own; "
                          "swap in one of its layers' attention configs instead")
    for key, value in kwargs.items():
        node.kwargs[key] = value
    swapped = OmegaConf.create(OmegaConf.to_container(cfg))
    swapped.attention = node
    for site in SITES:
        if f"{site}_attention" in swapped.model:
            swapped.model[f"{site}_attention"] = None
    if "layer_attentions" in swapped.model:
        swapped.model.layer_attentions = None
    try:
        check_attentions(swapped, sites)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"--attention {name}: {err}") from None
    return swapped


def parse_kwargs(items: Sequence[str]) -> dict[str, Any]:
    """``["num_features=4096", "kernel=relu"]`` -> ``{"num_features": 4096, "kernel": "relu"}`` (values as YAML)."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--attention-kwargs {item!r}: give key=value, e.g. num_features=4096")
        out[key.strip()] = yaml.safe_load(value)
    return out


def layer_patterns(keys: Sequence[str]) -> list[str]:
    """State-dict keys with their layer numbers as ``*``, each pattern once, in first-seen order."""
    return list(dict.fromkeys(re.sub(r"\.\d+\.", ".*.", k) for k in keys))


def _shared(key: str) -> bool:
    """Whether a key inside a MultiHeadAttention is one of its shared projections' tensors."""
    return key.split(".", 1)[0] in SHARED_PROJECTIONS


def _names(keys: Sequence[str]) -> str:
    more = f" and {len(keys) - SHOWN} more" if len(keys) > SHOWN else ""
    return ", ".join(keys[:SHOWN]) + more
