"""Hydra's own command-line mistakes as one ``error: ...`` line with exit status 2: a key not in the config
(``task.min_lenght=10``, ``experment=quickstart``), a config group option that does not exist (``attention=favr``)
and an override that does not parse; where a name is close to a real one the line says "did you mean".

Hydra composes the config inside its ``main`` and reports these errors itself (several lines, exit status 1,
advice to append the typo with ``+``); :func:`hydra_usage_errors` wraps Hydra's reporter
(``hydra._internal.utils.run_and_report``, hydra-core 1.3) for the length of one ``_app()`` call, so only the
composition errors change and every other error is reported as Hydra reports it."""

from __future__ import annotations

import contextlib
import re
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException

from efficient_attn_tasks.commands.cli import close_names, close_options, group_options
from efficient_attn_tasks.config.checks import CONFIG_DIR


def _missing_option(err: MissingConfigException) -> str | None:
    missing = getattr(err, "missing_cfg_file", None)
    if not missing or "/" not in missing:
        return None
    group, _, option = missing.partition("/")
    options = group_options(group) if (Path(CONFIG_DIR) / group).is_dir() and group != "hydra" else None
    if options is None:  # one of Hydra's own groups (hydra/launcher=...), which configs/hydra/ may extend
        group, _, option = missing.rpartition("/")
        options = list(getattr(err, "options", None) or [])
    if not options:
        return f"{group}={option}: no such config (configs/{group}/ is empty or missing)"
    close = close_options(option, options)
    if not close:
        fix = f"choose one of {options}"
    else:
        fix = f"did you mean {'one of ' if len(close) > 1 else ''}{group}={', '.join(close)}?"
    return f"{group}={option}: no such config; {fix}"


def _sweeps_a_group() -> bool:
    """Whether the command line is a -m run that sweeps a config group (e.g. attention=favor_plus,favor_m64)."""
    args = sys.argv[1:]
    groups = {p.name for p in Path(CONFIG_DIR).iterdir() if p.is_dir()}
    return any(a in ("-m", "--multirun") for a in args) and any(
        "," in a.partition("=")[2] and a.partition("=")[0].lstrip("+~") in groups for a in args)


def _unknown_key(err: ConfigCompositionException) -> str | None:
    cause = err.__cause__
    full_key = getattr(cause, "full_key", None)
    parent = getattr(cause, "parent_node", None)
    if not full_key or parent is None or not hasattr(parent, "keys"):
        return None
    prefix, _, key = str(full_key).rpartition(".")
    known = {str(k) for k in parent.keys()}
    if not prefix:  # the top level: its keys and the config groups (experiment=, attention=, ...)
        known |= {p.name for p in Path(CONFIG_DIR).iterdir() if p.is_dir()}
    close = close_names(key, known)
    added = re.search(r"use \+(\S+)", str(err))  # Hydra's advice: +<key>=<value>
    value = added.group(1).partition("=")[2] if added else None
    if not close:
        if _sweeps_a_group():  # Hydra applies plain overrides to its first composition too, before the sweep
            return (f"unknown config key {full_key} before the sweep's values are set: in a -m run, give a key that "
                    f"only the swept options have as a one-value sweep, {full_key}=choice({value or 'VALUE'})")
        how = f" (a new key is added with +{added.group(1)})" if added else ""
        return f"unknown config key {full_key}{how}; efficient-attn-train --cfg job shows the config"
    name = f"{prefix}.{close[0]}" if prefix else close[0]
    return f"unknown config key {full_key}; did you mean {name}{'=' + value if value is not None else ''}?"


def hydra_error_line(err: BaseException) -> str | None:
    """The one line for a Hydra command-line mistake (without ``error: ``), or None for any other error."""
    if isinstance(err, MissingConfigException):
        return _missing_option(err)
    if isinstance(err, OverrideParseException):
        first = str(err).splitlines()[0] if str(err) else "cannot parse an override"
        return (f"{first}; overrides are key=value, group=option or +key=value "
                "(https://hydra.cc/docs/advanced/override_grammar/basic)")
    if isinstance(err, ConfigCompositionException):
        line = _unknown_key(err)
        if line is None and str(err).startswith("Could not delete from config"):
            line = str(err).splitlines()[0]
        return line
    return None


@contextlib.contextmanager
def hydra_usage_errors() -> Iterator[None]:
    """Within it, Hydra's composition errors that :func:`hydra_error_line` knows are one ``error: ...`` line on
    stderr and exit status 2; everything else goes to Hydra's own reporter."""
    try:
        import hydra._internal.utils as hydra_utils
    except ImportError:  # another Hydra layout: its own reports
        yield
        return
    report: Callable[[Any], Any] | None = getattr(hydra_utils, "run_and_report", None)
    if report is None:
        yield
        return

    def run_and_report(func: Callable[[], Any]) -> Any:
        def first() -> Any:
            try:
                return func()
            except (ConfigCompositionException, OverrideParseException) as err:
                line = hydra_error_line(err)
                if line is None:
                    raise
                print(f"error: {line}", file=sys.stderr)
                sys.exit(2)

        return report(first)

    hydra_utils.run_and_report = run_and_report
    try:
        yield
    except ValueError as err:  # Hydra's own check of its flags, raised before run_and_report
        if not str(err).startswith("Only one of --run, --multirun"):
            raise
        print(f"error: {err} (--cfg job shows one job's config: drop -m)", file=sys.stderr)
        sys.exit(2)
    finally:
        hydra_utils.run_and_report = report
