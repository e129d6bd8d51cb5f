"""The Python subset NKI 0.3 compiles inside kernels, checked statically on the kernel's source.

NKI 0.3 to 0.6 (Neuron SDK 2.29 to 2.32) compile kernel bodies from a subset of Python; NKI 0.7 runs
the kernel's Python normally at trace time, so a kernel inside the 0.3 subset runs on every version
the project supports.  :func:`check_kernel` reads the source of a kernel and of every function it
calls by name (transitively, through each function's own module globals) and reports what the 0.3
compiler rejects or does not document:

``subset-is``            ``is`` / ``is not`` comparisons (0.3 update guide: use ``==`` / ``!=``)
``subset-raise``         ``raise`` (validate arguments on the host, before the launch)
``subset-builtin``       a builtin outside ``range len min max int float tuple list str divmod
                         isinstance print`` (no ``zip``, ``enumerate``, ``any``, ``all``, ``sum`` ...)
``subset-signature``     ``*`` keyword-only parameters, ``*args`` or ``**kwargs``
``subset-comprehension`` list/set/dict comprehensions and generator expressions (write the loop)
``subset-lambda``        ``lambda``; ``subset-nested-def``: a function defined inside a kernel body
``subset-try``           ``try``; ``subset-with``: ``with`` other than ``with nl.no_reorder()``
``subset-global``        ``global`` / ``nonlocal``; ``subset-yield``: generators and ``await``

The statements the language guide lists (``if``, ``for``, ``while``, assignments, tuple unpacking,
conditional expressions, ``assert``, f-strings in ``print``) pass.  :func:`run_kernel
<neuronmm_fx.kernels.standin.runtime.run_kernel>` runs the check before a kernel's first launch on
the stand-in and raises :class:`~neuronmm_fx.kernels.standin.rules.NkiRuleError` naming the rule.
"""

from __future__ import annotations

import ast
import builtins
import inspect
import textwrap
import types
from dataclasses import dataclass

from .rules import NkiRuleError

ALLOWED_BUILTINS = frozenset(
    {"range", "len", "min", "max", "int", "float", "tuple", "list", "str", "divmod", "isinstance", "print"}
)


@dataclass(frozen=True)
class Violation:
    rule: str
    function: str
    line: int  # in the function's source file
    message: str

    def __str__(self) -> str:
        return f"[{self.rule}] {self.function} line {self.line}: {self.message}"


_CONSTRUCTS = {  # node type: (rule, what it is)
    ast.Raise: ("subset-raise", "raise is not compiled inside a kernel; validate on the host"),
    ast.ListComp: ("subset-comprehension", "a list comprehension; write the for loop"),
    ast.SetComp: ("subset-comprehension", "a set comprehension; write the for loop"),
    ast.DictComp: ("subset-comprehension", "a dict comprehension; write the for loop"),
    ast.GeneratorExp: ("subset-comprehension", "a generator expression; write the for loop"),
    ast.Lambda: ("subset-lambda", "lambda is not compiled inside a kernel"),
    ast.Try: ("subset-try", "try/except is not compiled inside a kernel"),
    getattr(ast, "TryStar", ast.Try): ("subset-try", "try/except is not compiled inside a kernel"),
    ast.Global: ("subset-global", "global is not compiled inside a kernel"),
    ast.Nonlocal: ("subset-global", "nonlocal is not compiled inside a kernel"),
    ast.Yield: ("subset-yield", "a kernel is not a generator"),
    ast.YieldFrom: ("subset-yield", "a kernel is not a generator"),
    ast.Await: ("subset-yield", "await is not compiled inside a kernel"),
}


def _is_no_reorder(item: ast.withitem) -> bool:
    call = item.context_expr
    method = call.func if isinstance(call, ast.Call) else None
    return isinstance(method, ast.Attribute) and method.attr == "no_reorder"


class _Checker(ast.NodeVisitor):
    def __init__(self, name: str, first_line: int, known: set[str]) -> None:
        self.name, self.first_line, self.known = name, first_line, known
        self.violations: list[Violation] = []
        self.called: list[str] = []  # global names called, to follow
        self.depth = 0

    def _flag(self, node: ast.AST, rule: str, message: str) -> None:
        line = self.first_line + getattr(node, "lineno", 1) - 1
        self.violations.append(Violation(rule, self.name, line, message))

    def generic_visit(self, node: ast.AST) -> None:
        for kind, (rule, message) in _CONSTRUCTS.items():
            if isinstance(node, kind):
                self._flag(node, rule, message)
        super().generic_visit(node)

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        if self.depth:
            self._flag(node, "subset-nested-def", f"function {node.name} is defined inside a kernel body")
            return
        arguments = node.args
        if arguments.kwonlyargs or arguments.vararg or arguments.kwarg:
            self._flag(node, "subset-signature", "keyword-only parameters, *args, **kwargs are not compiled")
        self.depth += 1
        for statement in node.body:
            self.visit(statement)
        self.depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef  # noqa: N815 - ast.NodeVisitor's naming

    def visit_Compare(self, node: ast.Compare) -> None:
        if any(isinstance(op, (ast.Is, ast.IsNot)) for op in node.ops):
            self._flag(node, "subset-is", "is / is not are not compiled; compare with == or !=")
        self.generic_visit(node)

    def visit_With(self, node: ast.With) -> None:
        if not (len(node.items) == 1 and _is_no_reorder(node.items[0])):
            self._flag(node, "subset-with", "with is compiled only as `with nl.no_reorder():`")
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        if isinstance(node.func, ast.Name):
            name = node.func.id
            if name not in self.known and name in vars(builtins) and name not in ALLOWED_BUILTINS:
                self._flag(node, "subset-builtin", f"builtin {name}() is not in the NKI 0.3 subset")
            elif name not in vars(builtins):
                self.called.append(name)
        self.generic_visit(node)


def _source(fn: types.FunctionType) -> tuple[ast.FunctionDef, int]:
    try:
        lines, first_line = inspect.getsourcelines(fn)
    except (OSError, TypeError) as error:
        raise NkiRuleError(
            "subset-source",
            f"cannot read the source of {fn.__qualname__} to check it against the NKI 0.3 subset ({error})",
        ) from None
    try:
        tree = ast.parse(textwrap.dedent("".join(lines)))
    except SyntaxError as error:  # e.g. a docstring indented less than its function
        raise NkiRuleError(
            "subset-source", f"cannot parse the source of {fn.__qualname__} on its own ({error.msg})"
        ) from None
    return tree.body[0], first_line


def _stored_names(node: ast.AST) -> set[str]:
    names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    for function in ast.walk(node):
        if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            arguments = function.args
            names |= {a.arg for a in arguments.args + arguments.kwonlyargs + arguments.posonlyargs}
    return names


def _function_of(value) -> types.FunctionType | None:
    """The Python function behind a callable a kernel calls by name (a stand-in jit kernel's body)."""
    value = getattr(value, "fn", value)
    return value if isinstance(value, types.FunctionType) else None


def check_function(fn: types.FunctionType) -> tuple[list[Violation], list[types.FunctionType]]:
    """The violations in ``fn``'s own body, and the Python functions it calls by global name."""
    tree, first_line = _source(fn)
    scope = set(fn.__globals__) | set(fn.__code__.co_freevars) | _stored_names(tree)
    checker = _Checker(fn.__qualname__, first_line, scope)
    checker.visit(tree)
    closure = dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in fn.__closure__ or ()), strict=True))
    callees = []
    for name in dict.fromkeys(checker.called):
        callee = _function_of(fn.__globals__.get(name, closure.get(name)))
        if callee is not None:
            callees.append(callee)
    return checker.violations, callees


_CHECKED: dict[types.FunctionType, tuple[list[Violation], list[types.FunctionType]]] = {}


def check_kernel(fn) -> list[Violation]:
    """Every violation in ``fn`` (a kernel function or stand-in jit kernel) and the functions it
    calls, transitively; each function is read once per process."""
    root = _function_of(fn)
    if root is None:
        return []
    violations: list[Violation] = []
    seen: set[types.FunctionType] = set()
    pending = [root]
    while pending:
        function = pending.pop()
        if function in seen:
            continue
        seen.add(function)
        if function not in _CHECKED:
            _CHECKED[function] = check_function(function)
        own, callees = _CHECKED[function]
        violations += own
        pending += callees
    return violations


def require_subset(fn) -> None:
    """Raise :class:`NkiRuleError` (the first violation's rule) when ``fn`` leaves the NKI 0.3 subset."""
    violations = check_kernel(fn)
    if violations:
        listed = "; ".join(str(v) for v in violations)
        raise NkiRuleError(
            violations[0].rule,
            f"outside the Python subset NKI 0.3 compiles ({len(violations)} place(s)): {listed}",
        )
