"""Mutation testing of the attention core: break the code on purpose, check that a test notices.

    python -m tests.mutation [--out results/mutation.md] [--limit N] [--jobs 2] [--rev HEAD]

Each mutant changes one AST node of a file in efficient_attn/attention/ or efficient_attn/generate.py
(swap + and −, * and /, flip a comparison, change a numeric constant, drop an augmented assignment
or a call statement, replace an in-place/masking call by its receiver or a call by its first
argument, tril ↔ triu, drop a not/~/unary minus, and ↔ or, delete an ``if …: return`` branch).
Docstrings, messages, ``raise``/``assert``, argument validation (``if …: raise``), signatures and
``extra_repr`` are left alone. Every mutant runs the core tests on a private copy of the repository
(the working tree may be edited meanwhile); a test failure or a timeout kills it. Survivors are
listed in the report, with the reason each is harmless where one is known (``EQUIVALENT``).
"""

from __future__ import annotations

import argparse
import ast
import datetime
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def targets(root: Path = ROOT) -> list[str]:
    """Every .py file of efficient_attn/attention/, and efficient_attn/generate.py, under ``root``."""
    found = sorted(str(p.relative_to(root)) for p in (root / "efficient_attn" / "attention").glob("*.py"))
    return found + ["efficient_attn/generate.py"]

ATTENTION_TESTS = [  # fast and sharp first: with -x a killed mutant stops at its first failure
    "tests/test_reference.py", "tests/test_core_exact.py", "tests/test_gradcheck.py",
    "tests/test_properties.py", "tests/test_decode.py", "tests/test_numerics.py", "tests/test_favor.py",
    "tests/test_favor_precision.py", "tests/test_double_backward.py",
    "tests/test_multihead.py", "tests/test_registry.py", "tests/test_seeding.py",
]
GENERATE_TESTS = ["tests/test_generate.py"]
# with --rev the tests come from that revision too, except these, taken from the working tree
OVERLAY = ["tests/test_reference.py", "tests/test_core_exact.py", "tests/test_gradcheck.py",
           "tests/test_generate.py", "tests/test_numerics.py", "tests/mutation.py"]
PYTEST_ARGS = ["-x", "-q", "-p", "no:cacheprovider", "-p", "_mutation_guard"]

SWAP_BINOP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.Pow: ast.Mult}
FLIP_CMP = {
    ast.Lt: ast.GtE, ast.GtE: ast.Lt, ast.Gt: ast.LtE, ast.LtE: ast.Gt, ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In,
}
MODULES = {"torch", "F", "math", "nn", "np"}
SHAPE_CALLS = {  # integer arguments here are dimensions: changing them only crashes (a trivial kill)
    "transpose", "reshape", "view", "permute", "expand", "unsqueeze", "squeeze", "new_zeros", "new_empty",
    "empty", "zeros", "ones", "flatten", "size",
}
RECEIVER_METHODS = {"masked_fill", "tril", "triu", "where", "clamp", "contiguous"}
NO_FIRST_ARG = {
    "einsum", "cat", "stack", "zeros", "ones", "empty", "full", "tensor", "arange", "randn", "randint",
    "range", "len", "int", "float", "bool", "isinstance", "list", "tuple", "zip", "reversed", "enumerate",
    "dict", "set", "type", "super", "getattr", "str", "repr", "slice", "register_attention", "Generator",
    "next", "Parameter", "empty_like", "zeros_like", "ones_like", "register_buffer", "no_grad",
    "autocast", "TypeVar", "sorted", "signature", "apply",
}

# (file, original source line, mutation) -> why the mutant cannot change behaviour. Keyed by text, not
# line number, so entries survive edits elsewhere in the file; add one after reading a survivor.
EQUIVALENT: dict[tuple[str, str, str], str] = {
    ("efficient_attn/attention/base.py", "s = key_padding_mask.shape[-1]", "drop unary operator in `-1`"):
        "the mask is validated to be 2-D (B, S), so shape[1] is shape[-1]",
    ('efficient_attn/attention/additive.py', '_CHUNK_ELEMENTS = 1 << 21  # tanh elements alive at once when chunk_size is automatic (8 MiB fp32)',
     'constant 1 -> 0 in `1`'):
        'automatic chunk rows become max(1, 0) = 1: one query row per chunk, the same scores, only slower',
    ('efficient_attn/attention/additive.py', 'buf = qp.new_empty(b, h, min(rows, length), kp.shape[2], n)  # (B, H, rows, S, n)',
     'call -> its first argument in `min(rows, length)`'):
        "the backward's reusable buffer gets `rows` rows instead of min(rows, L): only a larger allocation; every chunk writes into a view of its own size",
    ('efficient_attn/attention/additive.py', 'out = buf[:, :, : qp.shape[2]]',
     'constant 2 -> 3 in `2`'):
        'the out= view then spans the whole buffer; torch resizes an out= tensor to the broadcast shape (B, H, c, S, n), so the same values are written and returned',
    ('efficient_attn/attention/base.py', 'k, v = k.masked_fill(pad, 0.0), v.masked_fill(pad, 0.0)  # padding (even inf/NaN) cannot leak',
     'constant 0.0 -> 1.0 in `0.0`'):
        'any finite fill works: every variant masks padded keys itself (softmax mask, zero value-and-normalizer rows); the fill only removes inf/NaN, which 1.0 does too (tests put NaN/inf there)',
    ('efficient_attn/attention/base.py', 'devices.add(default.index if default.index is not None else torch.cuda.current_device())',
     'drop statement in `devices.add(default.index if default.index is not None else torch.c...`'):
        'CUDA-only branch (default device is a GPU); no GPU on this machine',
    ('efficient_attn/attention/base.py', 'devices.add(default.index if default.index is not None else torch.cuda.current_device())',
     'comparison -> Is in `default.index is not None`'):
        'CUDA-only branch (default device is a GPU); no GPU on this machine',
    ('efficient_attn/attention/base.py', 'empty = (~visible.any(-1, keepdim=True)).expand(-1, length)  # (B, L)',
     'drop unary operator in `-1`'):
        'the mask is validated to be 2-D (B, S): dim 1 is dim -1',
    ('efficient_attn/attention/base.py', 'length, s = scores.shape[-2:]',
     'drop unary operator in `-2`'):
        'scores are 4-D (B, H, L, S): shape[2:] is shape[-2:]',
    ('efficient_attn/attention/causal_linear.py', 'out = _CausalLinear.apply(*flat, g, max(1, min(chunk_size, length)))  # (B·H, L, E)',
     'call -> its first argument in `min(chunk_size, length)`'):
        'a chunk longer than L is clipped to L by `_chunks` anyway (the first slice ends at L)',
    ('efficient_attn/attention/causal_linear.py', 'run_max = None if g is None else g.cummax(-1).values  # (BH, L): G_i',
     'drop unary operator in `-1`'):
        'g is 2-D (BH, L): cummax over dim 1 is over dim -1',
    ('efficient_attn/attention/favor.py', 'base = seed if seed is not None else int(torch.randint(2**31 - 1, ()))  # one draw from the global RNG',
     'operator -> Add in `2**31 - 1`'):
        'only the range of the one draw_seed taken from the global RNG moves by 2; any seed in it is as good',
    ('efficient_attn/attention/favor.py', 'generator = torch.Generator().manual_seed(int(self.draw_seed) * 1_000_003 + int(self.num_draws))',
     'operator -> Sub in `int(self.draw_seed) * 1_000_003 + int(self.num_draws)`'):
        'another injective map from (draw_seed, draw count) to a generator seed: draws stay distinct and reproducible',
    ('efficient_attn/attention/features.py', 'q = q * torch.sign(torch.diagonal(r))  # sign fix: makes q Haar-distributed',
     'operator -> Div in `q * torch.sign(torch.diagonal(r))`'):
        "the signs are ±1 (QR's R has a non-zero diagonal almost surely): dividing by ±1 is multiplying by it",
    ('efficient_attn/attention/features.py', 'if is_query:',
     'delete return branch in `if is_query: return feats, None`'):
        'queries then carry h(q) = exp(‖q‖²/2) as a log-scale the attention ignores and a gradient factor e^{s − s.detach()} of value 1: h(q) is one factor per output row and cancels in its ratio, so outputs and gradients are unchanged',
    ('efficient_attn/attention/kernel.py', "_PADDED_LOG_SCALE = -1e30  # below any real key's log-scale; finite, so differences stay defined",
     'constant 1e+30 -> 2e+30 in `1e30`'):
        "any log-scale far below every real key's works (e^{−1e30 − G} and e^{−2e30 − G} are both 0)",
    ('efficient_attn/attention/kernel.py', 'phi_q, _ = self.feature_map(q, is_query=True, fresh_grad=True)  # (B, H, L, M)',
     'constant True -> False in `True`'):
        "fresh_grad only lets the features' backward reuse the incoming gradient buffer; False allocates a new one (memory, not values)",
    ('efficient_attn/attention/kernel.py', 'phi_k, log_scale = self.feature_map(k, is_query=False, fresh_grad=True)  # (B, H, S, M)',
     'constant True -> False in `True`'):
        "fresh_grad only lets the features' backward reuse the incoming gradient buffer; False allocates a new one (memory, not values)",
    ('efficient_attn/attention/kernel.py', 'out1 = self.feature_map(q, is_query=True)[0] @ kv  # (B, H, 1, Dv+1)',
     'constant True -> False in `True`'):
        'decoding runs without gradients, and key- and query-style features have the same values (only their log-scale, discarded here, and their backward differ)',
    ('efficient_attn/attention/kernel.py', 'with torch.autocast(k.device.type, enabled=False):',
     'constant False -> True in `False`'):
        'the check passes k as both queries and keys, so L == S and causal=True adds no condition',
    ('efficient_attn/generate.py', 'tokens = logits.argmax(-1).masked_fill(done, pad)  # (B,)',
     'drop unary operator in `-1`'):
        'logits are 2-D (B, V): argmax over dim 1 is over dim -1',
    ('efficient_attn/generate.py', 'normalized = scores / ((5.0 + lengths.reshape(batch_size, k)) / 6.0) ** length_penalty  # (B, K)',
     'operator -> Mult in `(5.0 + lengths.reshape(batch_size, k)) / 6.0`'):
        "multiplies every beam's normalized score by the same positive 36^α: the argmax is unchanged",
    ('efficient_attn/attention/favor.py', 'self.num_draws.zero_()',
     'drop statement in `self.num_draws.zero_()`'):
        'the new stream then starts at draw index n instead of 0: still a deterministic function of (seed, module name), distinct per module and the same on every process',
    ('efficient_attn/attention/kernel.py', 'out1 = self.feature_map(q.to(kv.dtype), is_query=True)[0] @ kv  # (B, H, L, Dv+1)',
     'constant True -> False in `True`'):
        "key-style positive features of a query have the same values; their backward adds −x·Σᵢ φᵢ∂L/∂φᵢ, which is 0 for a query: its output is homogeneous of degree 0 in φ(q) (numerator and normalizer both linear), so the gradient is unchanged (tested against the forward's)",
    ("efficient_attn/generate.py",
     "normalized = scores / ((5.0 + lengths.reshape(batch_size, k)) / 6.0) ** length_penalty  # (B, K)",
     "constant 6.0 -> 12.0 in `6.0`"):
        "scales every beam's normalized score by the same positive 2^α: the argmax is unchanged "
        "(the /6 of Wu et al. is a convention)",
}


@dataclass
class Mutant:
    """One mutation: where, what, and the mutated module's source."""

    ident: int
    path: str
    line: int
    description: str
    context: str
    source: str
    outcome: str = "not run"
    seconds: float = 0.0
    detail: str = ""


# ---------------------------------------------------------------- finding mutation sites


def _is_docstring(node: ast.AST) -> bool:
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)


def _is_validation(node: ast.AST) -> bool:
    """``if …: raise …`` with no else: argument checking, not behaviour."""
    return isinstance(node, ast.If) and not node.orelse and all(isinstance(s, ast.Raise) for s in node.body)


def _skipped(node: ast.AST) -> bool:
    if isinstance(node, (ast.Raise, ast.Assert, ast.JoinedStr, ast.Import, ast.ImportFrom, ast.arguments)):
        return True
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == "extra_repr":
        return True
    if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "__all__" for t in node.targets):
        return True
    return _is_docstring(node) or _is_validation(node)


def _call_name(call: ast.Call) -> tuple[str, bool]:
    """(name, is_method): torch.exp / F.elu / max are functions; x.masked_fill is a method."""
    func = call.func
    if isinstance(func, ast.Name):
        return func.id, False
    if isinstance(func, ast.Attribute):
        is_module = isinstance(func.value, ast.Name) and func.value.id in MODULES
        return func.attr, not is_module
    return "", False


def _node_sites(node: ast.AST, parent: ast.AST | None, shape: bool = False) -> list[tuple[str, object]]:
    """(kind, argument) mutations this node admits; ``shape``: inside a dimension argument."""
    sites: list[tuple[str, object]] = []
    if shape and isinstance(node, (ast.Constant, ast.UnaryOp)):
        return sites
    if isinstance(node, ast.BinOp) and type(node.op) in SWAP_BINOP:
        sites.append(("binop", SWAP_BINOP[type(node.op)]))
    if isinstance(node, ast.AugAssign):
        sites.append(("drop", None))
        if type(node.op) in SWAP_BINOP:
            sites.append(("augop", SWAP_BINOP[type(node.op)]))
    if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in FLIP_CMP:
        sites.append(("compare", FLIP_CMP[type(node.ops[0])]))
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        sites.append(("constant", _new_constant(node.value)))
    if isinstance(node, ast.Constant) and type(node.value) is bool:
        sites.append(("constant", not node.value))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.Invert, ast.USub)):
        sites.append(("unary", None))
    if isinstance(node, ast.BoolOp):
        sites.append(("boolop", ast.Or if isinstance(node.op, ast.And) else ast.And))
    if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
        sites.append(("drop", None))
    if isinstance(node, (ast.Break, ast.Continue)):
        sites.append(("drop", None))
    if isinstance(node, ast.Call):
        name, is_method = _call_name(node)
        in_place = name.endswith("_") or name in RECEIVER_METHODS
        if is_method and in_place and name != "__init__" and not isinstance(parent, ast.Expr):
            sites.append(("receiver", None))
        if not is_method and node.args and name not in NO_FIRST_ARG and not isinstance(node.args[0], ast.Starred):
            sites.append(("first_arg", None))
    if isinstance(node, ast.Attribute) and node.attr in ("tril", "triu", "tril_", "triu_"):
        sites.append(("rename", node.attr.replace("tril", "TMP").replace("triu", "tril").replace("TMP", "triu")))
    if isinstance(node, ast.If) and node.body and isinstance(node.body[-1], ast.Return):
        sites.append(("drop_branch", None))
    return sites


def _new_constant(value: int | float) -> int | float:
    if value == 0:
        return type(value)(1)
    if value == 1:
        return type(value)(0)
    return value + 1 if isinstance(value, int) else value * 2


def _walk(tree: ast.AST) -> list[tuple[ast.AST, ast.AST | None, str, int | None, bool]]:
    """Every mutable node in a fixed order, with its parent, field and index (skipped regions pruned)."""
    out = []

    def visit(node: ast.AST, parent: ast.AST | None, field: str, index: int | None, shape: bool) -> None:
        if _skipped(node):
            return
        out.append((node, parent, field, index, shape))
        dims = isinstance(node, ast.Call) and _call_name(node)[0] in SHAPE_CALLS
        for name, value in ast.iter_fields(node):
            if name in ("annotation", "returns", "decorator_list", "type_comment"):
                continue
            inner = shape or (dims and name == "args")
            if isinstance(value, list):
                for i, child in enumerate(value):
                    if isinstance(child, ast.AST):
                        visit(child, node, name, i, inner and not isinstance(child, ast.Call))
            elif isinstance(value, ast.AST):
                visit(value, node, name, None, inner)

    visit(tree, None, "", None, False)
    return out


def _replace(parent: ast.AST, field: str, index: int | None, new: ast.AST) -> None:
    if index is None:
        setattr(parent, field, new)
    else:
        getattr(parent, field)[index] = new


def _apply(node: ast.AST, parent: ast.AST, field: str, index: int | None, kind: str, arg: object) -> None:
    if kind == "binop" or kind == "augop":
        node.op = arg()
    elif kind == "compare":
        node.ops = [arg()]
    elif kind == "constant":
        node.value = arg
    elif kind == "unary":
        _replace(parent, field, index, node.operand)
    elif kind == "boolop":
        node.op = arg()
    elif kind in ("drop", "drop_branch"):
        _replace(parent, field, index, ast.Pass())
    elif kind == "receiver":
        _replace(parent, field, index, node.func.value)
    elif kind == "first_arg":
        _replace(parent, field, index, node.args[0])
    elif kind == "rename":
        node.attr = arg


def _describe(kind: str, arg: object, node: ast.AST, source: str) -> str:
    segment = " ".join((ast.get_source_segment(source, node) or ast.unparse(node)).split())
    segment = segment if len(segment) <= 70 else segment[:67] + "..."
    what = {
        "binop": lambda: f"operator -> {type(arg()).__name__}",
        "augop": lambda: f"augmented operator -> {type(arg()).__name__}",
        "compare": lambda: f"comparison -> {type(arg()).__name__}",
        "constant": lambda: f"constant {getattr(node, 'value', '?')!r} -> {arg!r}",
        "unary": lambda: "drop unary operator",
        "boolop": lambda: f"boolean -> {arg.__name__}",
        "drop": lambda: "drop statement",
        "drop_branch": lambda: "delete return branch",
        "receiver": lambda: "call -> its receiver",
        "first_arg": lambda: "call -> its first argument",
        "rename": lambda: f"-> {arg}",
    }[kind]()
    return f"{what} in `{segment}`"


def mutants_of(path: str, root: Path = ROOT) -> list[tuple[int, str, str]]:
    """(line, description, mutated source) for every mutation of one file; duplicates dropped."""
    source = (root / path).read_text()
    original = ast.unparse(ast.parse(source))
    count = sum(len(_node_sites(n, p, d)) for n, p, _, _, d in _walk(ast.parse(source)))
    out, seen = [], {original}
    for k in range(count):
        tree = ast.parse(source)
        flat = [(n, p, f, i, s) for n, p, f, i, d in _walk(tree) for s in _node_sites(n, p, d)]
        node, parent, field, index, (kind, arg) = flat[k]
        description = _describe(kind, arg, node, source)
        line = node.lineno
        _apply(node, parent, field, index, kind, arg)
        mutated = ast.unparse(ast.fix_missing_locations(tree))
        if mutated in seen:
            continue
        seen.add(mutated)
        compile(mutated, path, "exec")
        out.append((line, description, mutated))
    return out


def all_mutants(root: Path = ROOT) -> list[Mutant]:
    found = []
    for path in targets(root):
        for line, description, source in mutants_of(path, root):
            context = (root / path).read_text().splitlines()[line - 1].strip()
            found.append(Mutant(len(found), path, line, description, context, source))
    return found


# ---------------------------------------------------------------- running them on private copies

GUARD = '''"""pytest plugin written by tests/mutation.py: the package under test must be this copy's."""
from pathlib import Path


def pytest_configure(config):
    import efficient_attn
    here = Path(__file__).resolve().parent
    if here not in Path(efficient_attn.__file__).resolve().parents:
        raise SystemExit(f"mutation copy not imported: efficient_attn from {efficient_attn.__file__}")
'''


def make_copy(dest: Path, rev: str | None) -> Path:
    """efficient_attn/, tests/ (working tree, or ``rev`` overlaid with OVERLAY), pyproject.toml -> dest."""
    dest.mkdir(parents=True)
    if rev is None:
        for folder in ("efficient_attn", "tests"):
            shutil.copytree(ROOT / folder, dest / folder, ignore=shutil.ignore_patterns("__pycache__"))
    else:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "efficient_attn", "tests"],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        for path in OVERLAY:
            shutil.copy2(ROOT / path, dest / path)
    for name in ("pyproject.toml", "conftest.py"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, dest / name)
    (dest / "_mutation_guard.py").write_text(GUARD)
    return dest


def tests_for(path: str) -> list[str]:
    return GENERATE_TESTS if path.endswith("generate.py") else ATTENTION_TESTS


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
        f"- source: " + (f"efficient_attn/ and tests/ at git {rev}, with the working tree's "
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
    lines += ["", "Rerun one mutant: `python -m tests.mutation --only ID` (IDs are stable for a given source).", ""]
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
    parser = argparse.ArgumentParser(prog="python -m tests.mutation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results/mutation.md", help="report path (relative to the repo)")
    parser.add_argument("--limit", type=int, default=0, help="run a fixed random sample of N mutants (0: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --limit sample")
    parser.add_argument("--jobs", type=int, default=2, help="mutants run in parallel, one private copy each")
    parser.add_argument("--timeout", type=float, default=0, help="seconds per mutant (0: 3× baseline + 30)")
    parser.add_argument("--rev", default=None,
                        help="mutate efficient_attn/ as of this git revision (tests too, but for OVERLAY)")
    parser.add_argument("--only", type=int, nargs="*", default=None, help="run just these mutant ids")
    parser.add_argument("--file", default=None, help="only mutants of files whose path contains this")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    return parser.parse_args(argv)


def select(mutants: list[Mutant], args: argparse.Namespace) -> list[Mutant]:
    chosen = [m for m in mutants if args.file is None or args.file in m.path]
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
    command = "python -m tests.mutation " + " ".join(sys.argv[1:] if argv is None else argv)
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
