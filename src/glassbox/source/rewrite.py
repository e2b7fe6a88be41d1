"""Rewrite a function so that each call in it can be intercepted: the AST side of ``.source``.

Offers:
    Compiled            one rewritten function: its code, op names in order, the line of each op,
                        the source lines of the listing, the callee of each op as a dotted name
    compiled(function)  the Compiled of a plain function (cached per code object)
    unwrap(function)    the innermost function of a decorator chain, and the chain
    rebuild(function, op)
                        a function running the rewritten code with ``op(name, callee, /, *args,
                        **kwargs)`` as its dispatcher, inside the same decorators, closure,
                        globals and defaults
    resolve(parts, function, owner, assigned)
                        what a dotted callee (``["torch", "matmul"]``) names, looked up without
                        running anything of the forward; None where that cannot be known
    OP                  the dispatcher's name in rewritten code

Every call ``f(args)`` becomes ``__gb_op__("f_0", f, args)``; zero-argument ``super()`` is left
alone (it reads ``__class__`` and ``self`` from the frame that calls it). Every assignment
``x = value`` becomes ``x = __gb_op__("x_0", __gb_bind__, value)`` (an identity), so a value that is
not a call's return is an op too, as in nnsight 0.8. The dispatcher gets the
callee together with its arguments, not before them: in ``torch.relu(self.fc1(x))`` the outer
callee is evaluated before ``self.fc1`` runs, and an op touched at ``self_fc1_0.output`` must still
catch the relu. Names are nnsight 0.8's: the callee's (or the assignment target's) dotted path
joined by ``_`` (a subscript is skipped; a method on an expression keeps only its own name:
``self.q_proj(h).view(s)`` -> ``view``), plus one counter per name, shared by calls and
assignments, in execution order: a call's arguments before the call, an assignment's value (then
its target's subscripts) before the binding. So ``attention_interface = get(...)`` is
``attention_interface_0`` and the later ``attention_interface(...)`` call ``attention_interface_1``.
What is bound: a single target (``x``, ``self.x``, ``x[i]`` -> ``x``), and in ``a, b = e1, e2``
each name its own element; ``a = b = v``, other unpacking (``a, b = f()``), augmented assignment,
``for``/``with`` targets and ``:=`` are not. The rewritten ``def`` is
compiled inside a factory whose parameters are the original's free variables and ``__gb_op__``,
nested in a class of the original's name where it had one, so closures, ``super()`` and
private-name mangling behave as in the original; the code object is then taken out of the factory
and given the original's globals (never copied or changed) and closure cells.
"""

from __future__ import annotations

import ast
import builtins
import inspect
import textwrap
import threading
import types
from dataclasses import dataclass, field
from typing import Any

OP = "__gb_op__"
BIND = "__gb_bind__"  # the identity an assignment's value is routed through


def bind(value: Any) -> Any:
    """What an assignment op calls: its input is its output."""
    return value

_FACTORY = "__gb_make__"


@dataclass(frozen=True)
class Compiled:
    """One rewritten function (the innermost of its decorator chain)."""

    code: types.CodeType
    qualname: str
    names: tuple[str, ...]  # op names, in execution order
    lines: dict[str, int]  # op name -> line index in ``text`` (0: the ``def`` line)
    text: tuple[str, ...]  # the dedented source, from the ``def`` line to the end
    callees: dict[str, list[str] | None]  # op name -> callee as a dotted name (None: not one)
    assigned: dict[str, list[list[str]]] = field(default_factory=dict)  # local -> dotted candidates
    bindings: frozenset[str] = frozenset()  # the op names that are assignments, not calls


_cache: dict[types.CodeType, Compiled] = {}
_cache_lock = threading.Lock()


def compiled(function: types.FunctionType) -> Compiled:
    """The Compiled of ``function`` (a plain function, decorators already peeled)."""
    code = function.__code__
    found = _cache.get(code)
    if found is None:
        found = _compile(function)
        with _cache_lock:
            found = _cache.setdefault(code, found)
    return found


def unwrap(function: Any) -> tuple[types.FunctionType, list[tuple[types.FunctionType, int]]]:
    """The innermost function of ``function``'s decorator chain (``functools.wraps`` wrappers), and the
    chain, outermost first, each wrapper with the index of the closure cell that holds the next."""
    chain: list[tuple[types.FunctionType, int]] = []
    while True:
        if type(function) is not types.FunctionType:
            raise TypeError(f"{function!r} is not a Python function: .source can only rewrite Python code")
        wrapped = function.__dict__.get("__wrapped__")
        if wrapped is None:
            return function, chain
        cells = function.__closure__ or ()
        index = next((i for i, cell in enumerate(cells) if _contents(cell) is wrapped), None)
        if index is None:
            raise TypeError(
                f"{function.__qualname__} wraps {getattr(wrapped, '__qualname__', wrapped)!r} without "
                "holding it in its closure, so .source cannot put the rewritten function inside it"
            )
        chain.append((function, index))
        function = wrapped


def rebuild(function: Any, op: Any) -> types.FunctionType:
    """``function`` (decorated or not) running its rewritten code, which calls ``op(name, fn, *args,
    **kwargs)`` for every call; its decorators are rebuilt around it with fresh closures (never
    edited in place: the function is the class's, shared by every instance)."""
    inner, chain = unwrap(function)
    result = compiled(inner)
    cells = dict(zip(inner.__code__.co_freevars, inner.__closure__ or ()))
    cells[OP] = types.CellType(op)
    cells[BIND] = types.CellType(bind)
    try:
        closure = tuple(cells[name] for name in result.code.co_freevars)
    except KeyError as missing:  # the compiler closed over a name the original did not
        raise TypeError(f".source could not rebuild {inner.__qualname__}: no cell for {missing}") from None
    built = _like(inner, result.code, closure)
    for wrapper, index in reversed(chain):
        outer = list(wrapper.__closure__ or ())
        outer[index] = types.CellType(built)
        built = _like(wrapper, wrapper.__code__, tuple(outer))
    return built


def resolve(parts: list[str] | None, function: types.FunctionType, owner: Any = None,
            assigned: dict[str, list[list[str]]] | None = None) -> Any:
    """The object a dotted callee names, looked up (never called) in ``function``'s closure, globals
    and builtins; ``self`` is ``owner`` (a module) when given. A local is tried through the
    names it was assigned from (``attention_interface = eager_attention_forward``, or a function
    passed to the call that assigned it). None where that cannot be known."""
    if not parts:
        return None
    root = parts[0]
    if root == "self" and owner is not None and len(parts) == 2:
        child = owner._modules.get(parts[1])
        return child if child is not None else _static(type(owner), parts[1])
    code = function.__code__
    cells = dict(zip(code.co_freevars, function.__closure__ or ()))
    if assigned and root in assigned:
        for candidate in assigned[root]:
            value = resolve(candidate, function, owner)
            if isinstance(value, types.FunctionType):
                return value
        return None
    if root in code.co_varnames:
        return None  # a parameter or a local bound by something other than a plain assignment
    if root in cells:
        value = _contents(cells[root])
    elif root in function.__globals__:
        value = function.__globals__[root]
    elif hasattr(builtins, root):
        value = getattr(builtins, root)
    else:
        return None
    for attr in parts[1:]:
        if not isinstance(value, (types.ModuleType, type)):
            return None  # an instance's attribute may be computed: do not guess
        value = _static(value, attr)
    return value


# ---------------------------------------------------------------- compiling


def _compile(function: types.FunctionType) -> Compiled:
    code = function.__code__
    try:
        lines, first = inspect.getsourcelines(code)  # the code object: getsource(fn) follows __wrapped__
    except (OSError, TypeError):
        raise TypeError(f"{function.__qualname__} has no Python source to rewrite") from None
    text = textwrap.dedent("".join(lines))
    tree = ast.parse(text)
    definition = tree.body[0]
    if not isinstance(definition, (ast.FunctionDef, ast.AsyncFunctionDef)):
        raise TypeError(f"{function.__qualname__} is not defined by a def statement: nothing to rewrite")
    start = definition.lineno  # after the decorators, which are dropped (rebuild re-applies them)
    shown = tuple(text.splitlines()[start - 1 : definition.end_lineno])
    definition.decorator_list = []
    assigned = _assignments(definition)
    rewriter = _Rewriter(start)
    rewriter.visit(definition)  # the signature too: nnsight counts calls in defaults
    factory: ast.stmt = ast.FunctionDef(
        name=_FACTORY,
        args=ast.arguments(posonlyargs=[], args=[ast.arg(arg=name) for name in (*code.co_freevars, OP, BIND)],
                           kwonlyargs=[], kw_defaults=[], defaults=[]),
        body=[definition, ast.Return(value=ast.Name(id=definition.name, ctx=ast.Load()))],
        decorator_list=[],
    )
    owner = _class_name(function.__qualname__)
    if owner is not None:  # private names (self.__x) are mangled with the class's name
        factory = ast.ClassDef(name=owner, bases=[], keywords=[], body=[factory], decorator_list=[])
    module = ast.Module(body=[ast.copy_location(factory, definition)], type_ignores=[])
    ast.increment_lineno(module, first - 1)  # tracebacks show the real file and line
    ast.fix_missing_locations(module)
    container = compile(module, code.co_filename, "exec")
    if owner is not None:
        container = _code_named(container, owner)
    rewritten = _code_named(_code_named(container, _FACTORY), code.co_name)
    return Compiled(rewritten, function.__qualname__, tuple(rewriter.names), rewriter.lines, shown,
                    rewriter.callees, assigned, frozenset(rewriter.bindings))


class _Rewriter(ast.NodeTransformer):
    """Every call -> ``__gb_op__("name_n", callee, args)`` and every plain assignment's value ->
    ``__gb_op__("target_n", __gb_bind__, value)``, numbered in execution order (module docstring)."""

    def __init__(self, start: int) -> None:
        self.start = start
        self.counts: dict[str, int] = {}
        self.names: list[str] = []
        self.lines: dict[str, int] = {}
        self.callees: dict[str, list[str] | None] = {}
        self.bindings: list[str] = []

    def _op(self, base: str, callee: ast.expr, args: list, keywords: list, node: ast.AST,
            parts: list[str] | None) -> ast.Call:
        count = self.counts.get(base, 0)
        self.counts[base] = count + 1
        name = f"{base}_{count}"
        self.names.append(name)
        self.lines[name] = node.lineno - self.start
        self.callees[name] = parts
        op = ast.Call(func=ast.Name(id=OP, ctx=ast.Load()), args=[ast.Constant(name), callee, *args],
                      keywords=keywords)
        return ast.copy_location(op, node)

    def visit_Call(self, node: ast.Call) -> ast.AST:
        if isinstance(node.func, ast.Name) and node.func.id == "super" and not (node.args or node.keywords):
            return node
        self.generic_visit(node)  # inner calls first: they run first
        return self._op(op_base(node.func), node.func, node.args, node.keywords, node, _chain(node.func))

    def visit_Assign(self, node: ast.Assign) -> ast.AST:
        node.value = self.visit(node.value)  # the value runs before the targets' subscripts
        node.targets = [self.visit(target) for target in node.targets]
        if len(node.targets) == 1:  # ``a = b = v``: one value, two names; left alone
            node.value = self._bound(node.targets[0], node.value, node)
        return node

    def visit_AnnAssign(self, node: ast.AnnAssign) -> ast.AST:
        if node.value is not None:  # the annotation is never evaluated; the target is not visited
            node.value = self._bound(node.target, self.visit(node.value), node)
        return node

    def _bound(self, target: ast.expr, value: ast.expr, node: ast.AST) -> ast.expr:
        """``value`` routed through the identity under the target's name; ``a, b = e1, e2`` binds each
        element; other unpacking, and a target with no name (``f()[0] = v``), are left as they are."""
        if isinstance(target, (ast.Tuple, ast.List)) and isinstance(value, (ast.Tuple, ast.List)):
            elements = [*target.elts, *value.elts]
            if len(target.elts) == len(value.elts) and not any(isinstance(e, ast.Starred) for e in elements):
                value.elts = [self._bound(t, v, node) for t, v in zip(target.elts, value.elts)]
            return value
        base = _target_base(target)
        if base is None:
            return value
        op = self._op(base, ast.Name(id=BIND, ctx=ast.Load()), [value], [], node, None)
        self.bindings.append(self.names[-1])
        return op


def op_base(callee: ast.expr) -> str:
    """The op name of a call without its counter: ``self.a.b`` -> ``self_a_b``; ``x[i].y`` -> ``x_y``
    (a subscript says where, not what); ``f(x).view`` -> ``view``; ``(lambda: 0)`` -> ``call``."""
    parts, _ = _dotted(callee)
    return "_".join(parts) or "call"


def _target_base(target: ast.expr) -> str | None:
    """An assignment target's op name without its counter (as op_base), or None where the target is
    not rooted in a name (``f()[0]``, a tuple, ...)."""
    parts, rooted = _dotted(target)
    return "_".join(parts) if rooted else None


def _dotted(node: ast.expr) -> tuple[list[str], bool]:
    """The names along ``node``'s attribute chain, outermost first (subscripts skipped), and whether
    the chain starts at a plain name."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute | ast.Subscript):
        if isinstance(node, ast.Attribute):
            parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return parts[::-1], isinstance(node, ast.Name)


def _assignments(definition: ast.AST) -> dict[str, list[list[str]]]:
    """local name -> dotted names it is assigned from: the value itself, or the names passed to the
    call that produced it (``get_interface(impl, eager_attention_forward)``), in source order."""
    found: dict[str, list[list[str]]] = {}
    for node in ast.walk(definition):
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            target, value = node.target, node.value
        else:
            continue
        if not isinstance(target, ast.Name):
            continue
        values = [value]
        if isinstance(value, ast.Call):
            values = [*value.args, *(k.value for k in value.keywords)]
        for item in values:
            parts = _chain(item)
            if parts is not None:
                found.setdefault(target.id, []).append(parts)
    return found


def _chain(expr: ast.expr) -> list[str] | None:
    """``a.b.c`` -> ["a", "b", "c"]; None for anything else (a subscript, a call, ...)."""
    parts: list[str] = []
    while isinstance(expr, ast.Attribute):
        parts.append(expr.attr)
        expr = expr.value
    if not isinstance(expr, ast.Name):
        return None
    parts.append(expr.id)
    return parts[::-1]


# ---------------------------------------------------------------- helpers


def _like(function: types.FunctionType, code: types.CodeType, closure: tuple) -> types.FunctionType:
    new = types.FunctionType(code, function.__globals__, function.__name__, function.__defaults__,
                             closure or None)
    new.__kwdefaults__ = function.__kwdefaults__
    new.__qualname__ = function.__qualname__
    new.__module__ = function.__module__
    new.__doc__ = function.__doc__
    return new


def _code_named(code: types.CodeType, name: str) -> types.CodeType:
    return next(c for c in code.co_consts if isinstance(c, types.CodeType) and c.co_name == name)


def _class_name(qualname: str) -> str | None:
    parts = qualname.split(".")
    if len(parts) < 2 or parts[-2] == "<locals>":
        return None
    return parts[-2]


def _contents(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell
        return None


def _static(owner: Any, name: str) -> Any:
    """``owner.name`` without running properties or ``__getattr__``; a staticmethod's function."""
    value = inspect.getattr_static(owner, name, None)
    if isinstance(value, (staticmethod, classmethod)):
        return value.__func__
    return value
