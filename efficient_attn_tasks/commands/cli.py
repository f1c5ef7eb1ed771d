"""``--help`` shared by the command lines (bench, approx, report): examples and outputs kept as written,
every option followed by its default. Imports nothing heavy, so ``--help`` answers in well under 2 s."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence, TextIO


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Description and epilog verbatim; every option's help ends with "(default: X)" unless it already
    says "default": flags show on/off, an option without a value by default shows "none"."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or not action.option_strings or action.default is argparse.SUPPRESS:
            return text
        return f"{text} (default: {show_default(action.default).replace('%', '%%')})"


def show_default(value: Any) -> str:
    """A default as a user would type it: flags on/off, lists space-separated, paths as written."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return str(value)


def epilog(examples: Sequence[str], outputs: Sequence[str]) -> str:
    """The text after the options: copy-paste examples, then where the outputs go."""
    lines = ["examples:", *(f"  {e}" for e in examples), "", "outputs:", *(f"  {o}" for o in outputs)]
    return "\n".join(lines)


def parser(prog: str, description: str, examples: Sequence[str], outputs: Sequence[str],
           **kwargs: Any) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` with this module's formatter and the examples/outputs epilog."""
    return argparse.ArgumentParser(prog=prog, description=description, epilog=epilog(examples, outputs),
                                   formatter_class=HelpFormatter, **kwargs)


def wrote(*paths: Path | str, file: TextIO | None = None) -> None:
    """One "wrote <path>" line per file a command wrote (stdout unless ``file``)."""
    for path in paths:
        print(f"wrote {path}", file=file or sys.stdout)
