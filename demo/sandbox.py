"""Checking a Python reply: the first function in it, compiled in a restricted namespace and
run against the reference on a few inputs.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable
from functools import cache
from typing import Any

from demo.problems import text_of
from demo.task_tables import PY_SPECS

SAFE_BUILTINS: dict[str, Callable[..., Any]] = {
    "abs": abs, "max": max, "min": min, "len": len,
    "str": str, "int": int, "bool": bool, "round": round,
}  # fmt: skip
_ALLOWED_NODES = (
    ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare, ast.IfExp, ast.Call, ast.Name, ast.Load,
    ast.Constant, ast.Subscript, ast.Slice, ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv,
    ast.Mod, ast.Pow, ast.USub, ast.UAdd, ast.Not, ast.And, ast.Or, ast.Eq, ast.NotEq, ast.Lt,
    ast.LtE, ast.Gt, ast.GtE,
)  # fmt: skip
PY_INPUTS: dict[str, tuple[tuple[Any, ...], ...]] = {
    "x": ((0,), (1,), (2,), (3,), (7,), (-4,), (10,)),
    "a, b": ((1, 2), (5, 3), (-2, 7), (4, 4), (0, 9)),
    "s": (("hello",), ("abc",), ("x",), ("python",), ("noon",)),
}
_DEF_RE = re.compile(r"\bdef\s+[A-Za-z_]\w*\s*\(")


def extract_function(reply: str) -> str | None:
    """Source of the first ``def`` in the reply: its line plus the indented lines after it."""
    lines = text_of(reply).replace("\r\n", "\n").split("\n")
    for i, line in enumerate(lines):
        match = _DEF_RE.search(line)
        if match is None:
            continue
        block = [line[match.start() :]]
        for nxt in lines[i + 1 :]:
            if nxt.strip() and not nxt[:1].isspace():
                break
            block.append(nxt)
        return "\n".join(block).rstrip()
    return None


def _safe_expr(expr: ast.expr, params: set[str]) -> bool:
    """A pure, small, loop-free expression over the parameters and a few builtins."""
    nodes = list(ast.walk(expr))
    if len(nodes) > 80:
        return False
    mults = pows = 0
    for node in nodes:
        if not isinstance(node, _ALLOWED_NODES):
            return False
        if isinstance(node, ast.Name) and node.id not in params | SAFE_BUILTINS.keys():
            return False
        if isinstance(node, ast.Call) and (
            not isinstance(node.func, ast.Name)
            or node.func.id not in SAFE_BUILTINS
            or node.keywords
            or len(node.args) > 3
        ):
            return False
        if isinstance(node, ast.Constant):
            v = node.value
            if v is not None and not isinstance(v, bool | int | float | str):
                return False
            if isinstance(v, int | float) and abs(v) > 100 or isinstance(v, str) and len(v) > 20:
                return False
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
            mults += 1
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
            pows += 1
            e = node.right
            if not (isinstance(e, ast.Constant) and type(e.value) is int and 0 <= e.value <= 4):
                return False
    return mults <= 3 and pows <= 1


def compile_function(code: str, arity: int) -> Callable[..., Any] | None:
    """Compile ``def f(args): return <expr>`` in a restricted namespace (None if not allowed).

    Only one ``return`` of a vetted expression is accepted (no imports, loops, attributes or
    calls beyond :data:`SAFE_BUILTINS`), so evaluation always terminates quickly.
    """
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return None
    fdef = next((n for n in tree.body if isinstance(n, ast.FunctionDef)), None)
    if fdef is None or fdef.decorator_list or fdef.returns or fdef.name.startswith("__"):
        return None
    a = fdef.args
    if a.posonlyargs or a.vararg or a.kwonlyargs or a.kwarg or a.defaults:
        return None
    if len(a.args) != arity or any(arg.annotation for arg in a.args):
        return None
    body = fdef.body
    if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # docstring
    if len(body) != 1 or not isinstance(body[0], ast.Return) or body[0].value is None:
        return None
    if not _safe_expr(body[0].value, {arg.arg for arg in a.args}):
        return None
    fdef.body = body
    namespace: dict[str, Any] = {"__builtins__": dict(SAFE_BUILTINS)}
    try:
        exec(compile(ast.Module(body=[fdef], type_ignores=[]), "<reply>", "exec"), namespace)
    except Exception:
        return None
    fn = namespace.get(fdef.name)
    return fn if callable(fn) else None


@cache
def _reference(func: str) -> Callable[..., Any]:
    spec = PY_SPECS[func]
    fn = compile_function(spec.code(), len(spec.args.split(",")))
    assert fn is not None, spec
    return fn


def check_python(reply: str, func: str) -> bool:
    """Whether the first function in ``reply`` behaves like ``PY_SPECS[func]`` on test inputs."""
    spec = PY_SPECS.get(func)
    code = extract_function(reply)
    if spec is None or code is None:
        return False
    fn = compile_function(code, len(spec.args.split(",")))
    if fn is None:
        return False
    ref = _reference(func)
    for args in PY_INPUTS[spec.args]:
        try:
            if not bool(fn(*args) == ref(*args)):
                return False
        except Exception:
            return False
    return True
