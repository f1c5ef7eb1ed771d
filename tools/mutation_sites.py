"""Where and how ``tools/mutation.py`` mutates the core: target files, AST sites, operators, the mutants."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MUTATIONS = (
    "Each mutant changes one AST node of a file in efficient_attn/attention/, efficient_attn/ops/ or "
    "efficient_attn/generate.py (swap + and −, * and /, flip a comparison, change a numeric constant, drop an "
    "augmented assignment or a call statement, replace an in-place/masking call by its receiver or a call by its "
    "first argument, tril ↔ triu, drop a not/~/unary minus, and ↔ or, delete an `if …: return` branch). "
    "Docstrings, messages, raise/assert, argument validation (`if …: raise`), signatures and extra_repr are left "
    "alone."
)


def targets(root: Path = ROOT) -> list[str]:
    """Every .py file of efficient_attn/attention/ and efficient_attn/ops/, and efficient_attn/generate.py."""
    folders = [root / "efficient_attn" / "attention", root / "efficient_attn" / "ops"]
    found = sorted(str(p.relative_to(root)) for folder in folders for p in folder.glob("*.py"))
    return found + ["efficient_attn/generate.py"]


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
