"""The attention registry: one name per variant, one constructor, loud errors.

Owns the name -> class table, the check of a variant's constructor when it registers,
``create_attention`` (unknown names and options raise, listing the known ones) and plugin discovery:
attentions from other packages register the same way, found through the ``efficient_attn.attentions``
entry-point group or imported by name (:func:`import_attentions`); the README shows both.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import inspect
import os
import sys
import warnings
from typing import Callable, Iterable, TypeVar

from torch import nn

_REGISTRY: dict[str, type[nn.Module]] = {}
_SHARED_ARGS = ("head_dim", "num_heads")
ENTRY_POINT_GROUP = "efficient_attn.attentions"
_PLUGINS: dict[str, str] | None = None  # entry point name -> "loaded" or why it failed; None: not scanned yet

T = TypeVar("T", bound=type[nn.Module])


def register_attention(name: str) -> Callable[[T], T]:
    """Class decorator adding an attention variant to the registry under ``name``."""

    def decorator(cls: T) -> T:
        if name in _REGISTRY:
            raise ValueError(
                f"attention {name!r} is already registered by {_REGISTRY[name].__qualname__}; "
                "pick another name"
            )
        params = inspect.signature(cls.__init__).parameters
        missing = [arg for arg in _SHARED_ARGS if arg not in params]
        positional = [
            key for key, p in params.items()
            if key != "self" and key not in _SHARED_ARGS and p.kind is not p.KEYWORD_ONLY
        ]
        if missing or positional:
            raise TypeError(
                f"{cls.__qualname__}.__init__ must accept {list(_SHARED_ARGS)} and take every other "
                f"option keyword-only (missing: {missing}, not keyword-only: {positional})"
            )
        _REGISTRY[name] = cls
        return cls

    return decorator


def _load_builtins() -> None:
    """Import the built-in variants (they register on import; a caller may reach the registry without
    ``efficient_attn.attention`` having been imported, since the package's ``__init__`` is lazy), then
    the installed plugins (once)."""
    # The one import cycle of the package, and a lazy one: attention/* import this module at load time to
    # register; this module imports attention/ only here, on the first read (tests/test_layout.py allows it).
    importlib.import_module(".attention", __package__)
    if _PLUGINS is None:
        _load_plugins()


def _load_plugins() -> None:
    """Load every entry point of :data:`ENTRY_POINT_GROUP`. A plugin that fails to import warns and is
    named in the unknown-attention error, rather than breaking every other attention."""
    global _PLUGINS
    _PLUGINS = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        where = f"{ep.name} = {ep.value!r} (from {ep.dist.name if ep.dist else 'an unknown distribution'})"
        try:
            obj = ep.load()
        except Exception as err:  # noqa: BLE001 - any failure of third-party code is reported, not raised
            _PLUGINS[ep.name] = f"{where} failed to load: {type(err).__name__}: {err}"
            warnings.warn(f"efficient_attn: attention plugin {_PLUGINS[ep.name]}", RuntimeWarning, stacklevel=3)
            continue
        if inspect.isclass(obj) and issubclass(obj, nn.Module) and obj not in _REGISTRY.values():
            register_attention(ep.name)(obj)  # a bare class: registered under the entry point's name
        _PLUGINS[ep.name] = "loaded"


def import_attentions(modules: Iterable[str]) -> None:
    """Import each module by name so that its ``@register_attention`` classes register (the training
    config's ``imports``). Looked up on ``sys.path`` and in the current directory (a console command's
    ``sys.path`` starts at its script's dir, not at the user's); one that cannot be imported raises
    ``ImportError`` naming it."""
    modules = list(modules)
    if modules and os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ImportError(f"imports: cannot import {module!r} ({err}); it must be importable (on sys.path "
                              "or installed) and register its attentions with @register_attention") from err


def list_attentions() -> list[str]:
    """Names of every registered attention, sorted."""
    _load_builtins()
    return sorted(_REGISTRY)


def get_attention_class(name: str) -> type[nn.Module]:
    """The class registered under ``name``; unknown names raise ``ValueError`` listing the known ones."""
    _load_builtins()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        failed = [why for why in (_PLUGINS or {}).values() if why != "loaded"]
        plugins = f" Attention plugins that failed to load: {'; '.join(failed)}." if failed else ""
        raise ValueError(
            f"unknown attention {name!r}.{hint} Registered attentions: {', '.join(list_attentions())}.{plugins} "
            "Your own attention: @register_attention in a module named by imports=[...] or by an "
            f"{ENTRY_POINT_GROUP!r} entry point"
        )
    return _REGISTRY[name]


def attention_options(name: str) -> dict[str, object]:
    """The keyword options ``name`` accepts (beyond head_dim/num_heads) and their defaults."""
    params = inspect.signature(get_attention_class(name).__init__).parameters
    return {
        key: (None if p.default is inspect.Parameter.empty else p.default)
        for key, p in params.items()
        if key != "self" and key not in _SHARED_ARGS and p.kind is p.KEYWORD_ONLY
    }


def create_attention(name: str, *, head_dim: int, num_heads: int, **kwargs) -> nn.Module:
    """Build the attention registered under ``name``.

    Unknown ``name`` raises ``ValueError`` (closest match and every registered name);
    an unknown keyword raises ``TypeError`` listing the accepted ones with their defaults.
    """
    cls = get_attention_class(name)
    accepted = attention_options(name)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        listing = ", ".join(f"{k}={v!r}" for k, v in accepted.items()) or "(none)"
        close = [m for u in unknown for m in difflib.get_close_matches(u, accepted, n=1)]
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise TypeError(
            f"attention {name!r} got unknown option(s) {unknown}.{hint} Accepted: {listing}"
        )
    return cls(head_dim=head_dim, num_heads=num_heads, **kwargs)
