"""What every command line shares: the opening (a bare command prints its help, then parse, then the work with
the errors a user can fix as one ``error: ...`` line and exit status 2) and the ``--help`` layout (examples and
outputs kept as written, every option followed by its default). Imports nothing heavy: ``--help`` stays fast."""

from __future__ import annotations

import argparse
import contextlib
import difflib
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn, Sequence, TextIO, TypeVar

T = TypeVar("T")
Errors = Callable[[], tuple[type[BaseException], ...]]


class UsageError(Exception):
    """A command-line mistake found while working (e.g. nothing under the given folders):
    ``<prog>: error: <message>; see <prog> --help`` (:meth:`Parser.error`), exit status 2."""


class CommandError(Exception):
    """A mistake in a command's arguments found before its work (a missing input, an output folder that cannot be
    written): one ``error: <message>`` line and exit status 2, whatever the command's ``errors``."""


def bare(argv: Sequence[str] | None) -> bool:
    """Whether the command started with no arguments at all (``argv`` None: the process's own)."""
    return argv is None and not sys.argv[1:]


def user_errors() -> tuple[type[BaseException], ...]:
    """The config and data errors, which say what to fix (imported only once something was raised)."""
    from efficient_attn_tasks.config.checks import ConfigError
    from efficient_attn_tasks.tasks.data import DataError

    return ConfigError, DataError


@contextlib.contextmanager
def known_errors(errors: Errors = user_errors) -> Iterator[None]:
    """A :class:`CommandError` or an error of one of ``errors()``'s types as one ``error: ...`` line on stderr and
    exit status 2; any other error goes on with its traceback."""
    try:
        yield
    except Exception as err:
        if not isinstance(err, (CommandError, *errors())):
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def run_command(make_parser: Callable[[], argparse.ArgumentParser], argv: Sequence[str] | None,
                body: Callable[[argparse.Namespace], T], *,
                check: Callable[[argparse.ArgumentParser, argparse.Namespace], None] | None = None,
                help_when_bare: bool = True, errors: Errors = user_errors) -> T | None:
    """A command's opening, then ``body(args)``, where the heavy imports belong.

    With no arguments at all (``help_when_bare``) the help, not a long run; else parse ``argv`` (None: the
    process's), ``check(parser, args)`` (it may call ``parser.error`` or raise a :class:`CommandError`, e.g. by
    :func:`writable_folder`), and ``body(args)``: a
    :class:`UsageError` becomes ``parser.error``, the ``errors`` one ``error: ...`` line (:func:`known_errors`).
    """
    if help_when_bare and bare(argv):
        make_parser().print_help()
        return None
    parser = make_parser()
    args = parser.parse_args(argv)
    with known_errors(errors):
        if check is not None:
            check(parser, args)
        try:
            return body(args)
        except UsageError as err:
            parser.error(str(err))


def writable_folder(path: Path, option: str, *, file: bool = False) -> None:
    """A folder a command can write into (``option`` names it in the error; ``file``: ``path`` is a file or a
    file prefix, whose folder is checked): it is one that can be written, or can be created under its nearest
    existing folder; creates nothing, so a refused command leaves nothing behind. A :class:`CommandError`
    otherwise."""
    given = path = Path(path)
    if file:
        path = path.parent
    base = path
    while not base.exists() and base != base.parent:  # the nearest existing part of the path
        base = base.parent
    if not base.is_dir():
        raise CommandError(f"{option} {given}: {base} is a file, not a folder; choose another {option}")
    if not os.access(base, os.W_OK | os.X_OK):
        what = f"{base} is not writable" if base == path else f"cannot create {path}, {base} is not writable"
        raise CommandError(f"{option} {given}: {what} (read-only); choose a folder you can write, "
                           f"e.g. {option} {Path.home() / given.name if given.name else Path.home()}")


def existing(path: Path, option: str, what: str = "file or folder") -> None:
    """An input path that exists; a :class:`CommandError` naming ``option`` (if any) otherwise."""
    if not Path(path).exists():
        raise CommandError(f"{option + ' ' if option else ''}{path}: no such {what}; check the path")


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line, ``<prog>: error: <message>; see <prog> --help`` (exit
    status 2), not the usage block first."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


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


def parser(prog: str, text: str, **kwargs: Any) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` whose help shows ``text`` as written: what comes before its ``examples:`` line above
    the options, the examples and then the outputs (``outputs:``) after them."""
    description, found, rest = text.partition("\nexamples:\n")
    if not found or "\noutputs:\n" not in rest:
        raise ValueError(f"{prog}: the help text needs an examples: and an outputs: section")
    return Parser(prog=prog, description=description.strip("\n"), epilog=found.lstrip("\n") + rest.rstrip("\n"),
                  formatter_class=HelpFormatter, **kwargs)


def checkpoint_parser(prog: str, text: str, checkpoint: str) -> argparse.ArgumentParser:
    """:func:`parser` for a command that runs one trained checkpoint on its own: the ``checkpoint`` argument
    (``checkpoint`` names the file, e.g. "an lm .ckpt file"; a run dir means its best checkpoint) and ``--device``."""
    p = parser(prog, text)
    p.add_argument("checkpoint", type=Path, help=f"{checkpoint}, or a run dir (its best checkpoint)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA if there is one")
    return p


def check_checkpoint_args(args: argparse.Namespace, *, positive: Sequence[str] = (),
                          non_negative: Sequence[str] = ()) -> None:
    """The arguments of a :func:`checkpoint_parser` command that need no torch to check: the checkpoint exists,
    the options named in ``positive`` (e.g. "beam") are >= 1 and those in ``non_negative`` >= 0 when given, so a
    mistake is one line in a fraction of a second, not after torch and Lightning load."""
    if not args.checkpoint.exists():
        raise CommandError(f"{args.checkpoint} is neither a checkpoint file nor a run dir; give a .ckpt file or a "
                           "run dir")
    for names, low in ((positive, 1), (non_negative, 0)):
        for name in names:
            value = getattr(args, name)
            if value is not None and value < low:
                raise CommandError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")


def close_names(name: str, known: Any, n: int = 1) -> list[str]:
    """The (at most ``n``) names of ``known`` closest to ``name`` (difflib), closest first."""
    return difflib.get_close_matches(name, sorted(set(known)), n=n)


def close_options(option: str, options: list[str]) -> list[str]:
    """The config closest to ``option``, or a whole family when ``option`` is closest to the family's stem
    (``favr``: every ``favor_*`` config, whose names differ only after the stem)."""
    stems = {o.split("_")[0] for o in options if "_" in o} - set(options)
    close = close_names(option, set(options) | stems)
    if close and close[0] in stems:
        return [o for o in options if o.startswith(close[0] + "_")]
    return close


def group_options(group: str, config_dir: Path | str | None = None) -> list[str]:
    """Every option of a config group (of the app's config tree unless ``config_dir``), nested ones as
    ``mqar/quick``."""
    if config_dir is None:
        from efficient_attn_tasks import config_dir as app_config_dir

        config_dir = app_config_dir()
    root = Path(config_dir) / group
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def wrote(*paths: Path | str, file: TextIO | None = None) -> None:
    """One "wrote <path>" line per file a command wrote (stdout unless ``file``)."""
    for path in paths:
        print(f"wrote {path}", file=file or sys.stdout)
