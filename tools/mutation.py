"""Mutation testing of the attention core: break the code on purpose, check that a test notices.

Owns the runs and the report (``python -m tools.mutation --help``); ``mutation_sites`` owns which mutants
exist, ``mutation_equivalent`` the reasons some survivors are harmless. Every mutant runs the core tests on a
private copy of the repository (the working tree may be edited meanwhile); a test failure or a timeout kills
it. Survivors are listed in the report, with the reason each is harmless where one is known.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tools.mutation_equivalent import EQUIVALENT
from tools.mutation_sites import MUTATIONS, ROOT, Mutant, all_mutants, targets

ATTENTION_TESTS = [  # fast and sharp first: with -x a killed mutant stops at its first failure
    "tests/test_reference.py", "tests/test_core_exact.py", "tests/test_gradcheck.py",
    "tests/test_properties.py", "tests/test_decode.py", "tests/test_numerics.py", "tests/test_favor.py",
    "tests/test_favor_features.py",
    "tests/test_favor_precision.py", "tests/test_favor_fused.py", "tests/test_double_backward.py",
    "tests/test_kernel_memory.py",  # recompute on and off: the paths kept for backward, and their memory
    "tests/test_multihead.py", "tests/test_registry.py", "tests/test_seeding.py",
]
GENERATE_TESTS = ["tests/test_generate.py", "tests/test_beam.py"]
# files whose own tests live in their family's file: the token-gated recurrences and their kernels
FAMILY = {stem: "gated" for stem in ("gla", "mamba2", "deltanet", "gated_deltanet", "delta")}
# with --rev the tests come from that revision too, except these, taken from the working tree
OVERLAY = ["tests/helpers.py", "tests/test_reference.py", "tests/test_core_exact.py", "tests/test_gradcheck.py",
           "tests/test_generate.py", "tests/test_beam.py", "tests/test_numerics.py"]
# what the tests import besides the core (the application, its configs, tools.faults): always the working tree's
SUPPORT = ["efficient_attn_tasks", "configs", "tools"]
PYTEST_ARGS = ["-x", "-q", "-p", "no:cacheprovider", "-p", "_mutation_guard"]

# ---------------------------------------------------------------- running them on private copies

GUARD = '''"""pytest plugin written by tools/mutation.py: the package under test must be this copy's."""
from pathlib import Path


def pytest_configure(config):
    import efficient_attn
    here = Path(__file__).resolve().parent
    if here not in Path(efficient_attn.__file__).resolve().parents:
        raise SystemExit(f"mutation copy not imported: efficient_attn from {efficient_attn.__file__}")
'''


def make_copy(dest: Path, rev: str | None) -> Path:
    """efficient_attn/, tests/ (working tree, or ``rev`` overlaid with OVERLAY), SUPPORT, pyproject.toml -> dest."""
    dest.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__")
    if rev is None:
        for folder in ("efficient_attn", "tests"):
            shutil.copytree(ROOT / folder, dest / folder, ignore=ignore)
    else:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "efficient_attn", "tests"],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        for path in OVERLAY:
            shutil.copy2(ROOT / path, dest / path)
    for folder in SUPPORT:
        shutil.copytree(ROOT / folder, dest / folder, ignore=ignore)
    for name in ("pyproject.toml", "conftest.py"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, dest / name)
    (dest / "_mutation_guard.py").write_text(GUARD)
    return dest


def tests_for(path: str) -> list[str]:
    """The suites a mutant of ``path`` runs: a variant's own test file first (tests/test_<file>.py, e.g.
    test_hedgehog.py for attention/hedgehog.py), then the shared core suites."""
    if path.endswith("generate.py"):
        return GENERATE_TESTS
    own = f"tests/test_{FAMILY.get(Path(path).stem, Path(path).stem)}.py"
    return [own, *ATTENTION_TESTS] if own not in ATTENTION_TESTS and (ROOT / own).is_file() else ATTENTION_TESTS


def run_tests(copy_dir: Path, tests: list[str], timeout: float) -> tuple[str, float, str]:
    """('passed' | 'failed' | 'timeout', seconds, last lines of output)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("PYTHONPATH", None)
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "pytest", *PYTEST_ARGS, *tests], cwd=copy_dir, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.communicate()
        return "timeout", time.monotonic() - start, ""
    tail = "\n".join(out.strip().splitlines()[-3:])
    return ("passed" if proc.returncode == 0 else "failed"), time.monotonic() - start, tail


def run_mutant(mutant: Mutant, copy_dir: Path, timeout: float) -> Mutant:
    target = copy_dir / mutant.path
    original = target.read_text()
    target.write_text(mutant.source)
    try:
        outcome, mutant.seconds, mutant.detail = run_tests(copy_dir, tests_for(mutant.path), timeout)
    finally:
        target.write_text(original)
    mutant.outcome = {"passed": "survived", "failed": "killed", "timeout": "killed (timeout)"}[outcome]
    return mutant


def check_copy(copy_dir: Path) -> str:
    """The copy's package is the one imported: returns efficient_attn.__file__ as seen from the copy."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", "import efficient_attn; print(efficient_attn.__file__)"],
                         cwd=copy_dir, env=env, capture_output=True, text=True, check=True).stdout.strip()
    if Path(copy_dir).resolve() not in Path(out).resolve().parents:
        raise SystemExit(f"the copy is not what gets imported: {out}")
    return out


# ---------------------------------------------------------------- report


def report(mutants: list[Mutant], command: str, rev: str | None, baseline: dict[str, float], wall: float) -> str:
    ran = [m for m in mutants if m.outcome != "not run"]
    killed = [m for m in ran if m.outcome.startswith("killed")]
    survivors = [m for m in ran if m.outcome == "survived"]
    times = sorted(m.seconds for m in ran)
    lines = [
        "# Mutation testing of the attention core",
        "",
        f"- command: `{command}`",
        "- source: " + (f"efficient_attn/ and tests/ at git {rev}, with the working tree's "
                         + ", ".join(Path(p).name for p in OVERLAY) if rev else "the working tree"),
        f"- machine: {platform.node()} · {platform.platform()} · {os.cpu_count()} CPUs · Python "
        f"{platform.python_version()} · torch {_torch_version()} · working-tree HEAD {_git_head()}",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- **score: {len(killed)}/{len(ran)} killed** ({100 * len(killed) / max(1, len(ran)):.0f}%); "
        f"{len(survivors)} survived, of which {sum(_why(m) != 'NOT EXPLAINED' for m in survivors)} explained",
        f"- time: {wall / 60:.1f} min wall; per mutant median {_pct(times, 0.5):.0f} s, max "
        f"{_pct(times, 1.0):.0f} s; unmutated core suites: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in baseline.items()),
        "",
        "| file | killed / run |",
        "|---|---|",
    ]
    for path in sorted({m.path for m in ran}):
        mine = [m for m in ran if m.path == path]
        if mine:
            lines.append(f"| {path} | {sum(m.outcome.startswith('killed') for m in mine)} / {len(mine)} |")
    lines += ["", "## Surviving mutants", ""]
    if not survivors:
        lines.append("None.")
    else:
        lines += ["| # | file:line | mutation | why harmless |", "|---|---|---|---|"]
        for m in survivors:
            lines.append(f"| {m.ident} | {m.path}:{m.line} | {m.description.replace('|', '∣')} | {_why(m)} |")
    lines += ["", "Rerun one mutant: `python -m tools.mutation --only ID` (IDs are stable for a given source).", ""]
    return "\n".join(lines)


def _why(m: Mutant) -> str:
    return EQUIVALENT.get((m.path, m.context, m.description), "NOT EXPLAINED")


def _pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * (len(values) - 1) + 0.5))] if values else 0.0


def _git_head() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "no git"


def _torch_version() -> str:
    import importlib.metadata

    return importlib.metadata.version("torch")


# ---------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tools.mutation", description=__doc__.split("\n\n")[0] + " " + MUTATIONS,
        epilog="quick check: --list --file numerics (no test run); one mutant: --only ID --jobs 1",
    )
    parser.add_argument("--out", default="results/mutation.md", help="report path (relative to the repo)")
    parser.add_argument("--limit", type=int, default=0, help="run a fixed random sample of N mutants (0: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --limit sample")
    parser.add_argument("--jobs", type=int, default=2, help="mutants run in parallel, one private copy each")
    parser.add_argument("--timeout", type=float, default=0, help="seconds per mutant (0: 3× baseline + 30)")
    parser.add_argument("--rev", default=None,
                        help="mutate efficient_attn/ as of this git revision (tests too, but for OVERLAY)")
    parser.add_argument("--only", type=int, nargs="*", default=None, help="run just these mutant ids")
    parser.add_argument("--file", default=None, help="only mutants of files whose path contains this")
    parser.add_argument("--changed-since", default=None, metavar="REV",
                        help="only mutants on lines changed since this git revision (in the source mutated)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    return parser.parse_args(argv)


def changed_lines(since: str, rev: str | None) -> dict[str, set[int]]:
    """Per file of efficient_attn/, the line numbers (in ``rev``, or the working tree) that ``git diff -U0`` from
    ``since`` marks as added or changed."""
    command = ["git", "-C", str(ROOT), "diff", "-U0", since, *([rev] if rev else []), "--", "efficient_attn"]
    return added_lines(subprocess.run(command, capture_output=True, text=True, check=True).stdout)


def added_lines(diff: str) -> dict[str, set[int]]:
    """The new side's line numbers of each hunk of a ``git diff -U0``, per file (deleted files left out)."""
    lines: dict[str, set[int]] = {}
    path = None
    for text in diff.splitlines():
        if text.startswith("+++ "):
            path = text[6:] if text.startswith("+++ b/") else None
        hunk = re.match(r"@@ -\S+ \+(\d+)(?:,(\d+))? @@", text)
        if hunk and path is not None:
            start, count = int(hunk.group(1)), int(hunk.group(2) or 1)
            lines.setdefault(path, set()).update(range(start, start + count))
    return lines


def select(mutants: list[Mutant], args: argparse.Namespace) -> list[Mutant]:
    chosen = [m for m in mutants if args.file is None or args.file in m.path]
    if args.changed_since is not None:
        changed = changed_lines(args.changed_since, args.rev)
        chosen = [m for m in chosen if m.line in changed.get(m.path, ())]
    if args.only is not None:
        chosen = [m for m in chosen if m.ident in set(args.only)]
    if args.limit and args.limit < len(chosen):
        chosen = sorted(random.Random(args.seed).sample(chosen, args.limit), key=lambda m: m.ident)
    return chosen


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.rev is not None:  # pin the revision now: HEAD may move while mutants run
        args.rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.rev],
                                  capture_output=True, text=True, check=True).stdout.strip()
    command = "python -m tools.mutation " + " ".join(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory(prefix="mutation-") as tmp:
        copies = [make_copy(Path(tmp) / f"job{j}", args.rev) for j in range(max(1, args.jobs))]
        mutants = all_mutants(copies[0])
        chosen = select(mutants, args)
        if args.list:
            for m in chosen:
                print(f"{m.ident:4d} {m.path}:{m.line} {m.description}")
            return 0
        files = len(targets(copies[0]))
        print(f"{len(mutants)} mutants in {files} files; running {len(chosen)} on {len(copies)} copies")
        print(f"imported from the copy: {check_copy(copies[0])}")
        baseline = {}
        for suite in {tests_for(m.path)[0]: tests_for(m.path) for m in chosen}.values():
            outcome, seconds, tail = run_tests(copies[0], suite, timeout=1800)
            if outcome != "passed":
                raise SystemExit(f"unmutated tests do not pass ({suite}):\n{tail}")
            baseline[" ".join(Path(t).stem for t in suite[:1]) + ("…" if len(suite) > 1 else "")] = seconds
        timeout = args.timeout or 3 * max(baseline.values(), default=60) + 30
        start = time.monotonic()
        free = list(copies)

        def job(m: Mutant) -> Mutant:
            copy_dir = free.pop()
            try:
                run_mutant(m, copy_dir, timeout)
            finally:
                free.append(copy_dir)
            print(f"[{m.ident}] {m.outcome:16s} {m.seconds:5.1f}s {m.path}:{m.line} {m.description}",
                  flush=True)
            return m

        with ThreadPoolExecutor(max_workers=len(copies)) as pool:
            list(pool.map(job, chosen))
        text = report(chosen, command, args.rev, baseline, time.monotonic() - start)
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
