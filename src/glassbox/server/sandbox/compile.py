"""Compile and run untrusted interpretability code under restriction.

Offers:
    SandboxError                              what remote code tried and what to do instead
    compile_restricted_source(source, filename) -> CodeType
    compile_restricted_ast(module, filename)    -> CodeType   (same policy; for invoke bodies)
    make_globals(allowed, *, print_fn=None, protected=())     the globals to ``exec`` it in
    register_source(filename, source)         let linecache (tracebacks, glassbox's invoke
                                              capture) find the source of ``filename``
    compile_function(fn, globals)             define a ``RemoteFunction`` in a job's globals
    GUARD_NAMES                               globals the compiled code needs besides the user's

Use::

    code = compile_restricted_source(src, "<job 17>")
    register_source("<job 17>", src)
    exec(code, make_globals({"model": model, "x": x}, print_fn=stream.write, protected=[model]))

How it works: RestrictedPython rewrites the AST so that every attribute read,
item read, assignment target, augmented assignment, iteration and ``print``
goes through a guard function (``_getattr_``, ``_write_``, ...) that
``make_globals`` supplies from ``guards.Policy``; names starting with ``_``
are rejected at compile time, so the code can neither name nor replace them.

Policy (decisions, and why):
  Compile time
  - Everything RestrictedPython refuses stays refused: names and attributes
    starting with ``_`` (dunder walks such as ``().__class__.__mro__``), frame
    and generator attributes, ``exec``/``eval``, ``nonlocal``, ``async``,
    ``try/except*``, ``match``. Class definitions are refused too: a class
    body is the one place dunder methods could be defined.
  - Extended: ``x[k] op= v`` and ``x.a op= v`` (RestrictedPython refuses them;
    interpretability code does ``h[:, -1] *= 1.5`` all the time) compile to
    guarded calls that read once, apply the in-place operator, and write back.
  Builtins
  - Pure builtins only (len, range, zip, sorted, min, max, isinstance, ...,
    and the exception classes derived from Exception). ``getattr`` /
    ``hasattr`` are the guarded versions. ``open``, ``eval``, ``exec``,
    ``compile``, ``type``, ``object``, ``super``, ``vars``, ``dir``,
    ``globals``, ``locals``, ``setattr``, ``delattr``, ``breakpoint``,
    ``input``, ``memoryview``, ``bytearray`` raise SandboxError when called
    (a variable named ``input`` still works).
  - ``print`` goes to the ``print_fn`` callback (``file=`` is refused);
    ``tracer.log(...)`` too.
  Imports: ``torch`` (with ``nn``, ``nn.functional``, ``nn.init``, ``linalg``,
  ``fft``, ``special``, ``distributions``, parts of ``autograd`` / ``func`` /
  ``cuda``), ``math``, ``itertools``, parts of ``functools`` and
  ``collections``, ``einops`` if installed, and ``glassbox.save``. Each comes
  as a read-only ModuleView (whitelist.py): no monkeypatching, no private
  names, no unlisted submodules. Refused in torch: ``load``, ``save``,
  ``hub``, ``from_file``, ``frombuffer``, ``asarray``, ``compile``, ``jit``,
  ``ops``, ``library``, ``utils``, ``backends``, ``distributed``,
  ``multiprocessing``, ``fork``/``wait`` (threads), every class but a short
  list (Tensor, Size, dtype, device, Generator, finfo, no_grad, autocast,
  ...: torch re-exports TorchScript internals such as ``CompilationUnit``,
  which compiles code from a string), every ``set_*`` and ``use_*``
  (process-wide state that would leak into the next job; grad mode has
  ``torch.no_grad()``). ``torch.func.functional_call`` is left out: it swaps
  the served module's parameters while it runs. ``torch.manual_seed`` is
  allowed: seeding is how users make sampling reproducible; the worker
  should reseed per job. numpy is not importable: ``np.asarray(weight)`` is
  a writable alias of the weights, and numpy reads and writes files.
  Attributes everywhere: names containing save/load/dump/pickle/file/hub/
  pretrained/register/hook/open/write/export/compile/exec/ctypes/... are
  refused (files, hooks that outlive the job, serialisation), except
  glassbox's own ``.save()``; reaching a module object, a frame, code, or the
  real ``open``/``eval``/``getattr``... through any attribute or item is
  refused. ``str.format``/``format_map`` are checked: no ``{0.attr}`` or
  ``{0[key]}`` fields. On objects that are not the user's own lists, dicts
  and sets, mutating methods (``set_*``, ``add_*``, ``update``, ``pop``,
  ``clear``, ``no_*``, ...) are refused, and so are attribute assignments:
  configs and tokenizers are shared by every job. Through a class (unbound
  methods take any ``self``), in-place and mutating names are refused.
  Tensors: ``.numpy``, ``.storage``, ``.untyped_storage``, ``.data_ptr``,
  ``.set_``, ``.share_memory_`` are refused; ``.data``, ``.detach()`` and
  views are allowed, and stay protected (below). ``tensor.data = ...`` is
  refused (it would rebind the memory an earlier ``t.zero_`` points at).
  The served model (every Envoy and module passed in, plus ``protected=``):
  - Its weights are protected by memory, not by name: any tensor whose
    storage overlaps a protected tensor's memory (views, ``.data``,
    ``.detach()``, ``nn.Parameter(w)``, ``torch.from_dlpack``) cannot be
    written: in-place methods (``name_``), ``x[...] = ``, ``x op= ``,
    ``out=``, ``inplace=True``, ``max_norm=`` (embedding), batch / instance
    norm running statistics, ``torch.nn.init`` and in-place library
    functions all check. A tensor whose memory cannot be located (inside
    ``torch.vmap`` / ``torch.func``) counts as protected: fail closed.
  - An activation must not be a weight: assigning a tensor that shares a
    weight's memory to ``.output``/``.input``/``.inputs`` or passing it to
    ``.skip()`` is refused, since the model may edit activations in place.
  - Envoys expose ``.output``/``.input``/``.inputs`` (read and assign),
    ``.skip``, ``.next``, ``.modules``, ``trace``/``session``/``generate``
    (``remote=`` refused: it already runs on the server), ``tokenizer``,
    ``config`` and read access to the module's attributes. Module methods
    that could change the model (``to``, ``half``, ``train``, ``apply``,
    ``register_*``, ``load_state_dict``, ``zero_grad``, ``dispatch``,
    ``edit``, ...) are refused; ``forward``, ``parameters``, ``get_*``,
    ``state_dict`` and friends are fine. No attribute of the served model
    can be assigned or deleted except ``.output``/``.input``/``.inputs``.
  Not blocked here, caught after the job by ``integrity.WeightGuard`` (the
  worker must verify and restore after every job): calling a module of the
  model that itself computes in place (``ReLU(inplace=True)``) with a weight
  as its input; mutation of shared non-tensor state through a plain dict or
  list the model exposes (``config.id2label[0] = ...``) or through mutating
  methods with unusual names. Process limits (time, memory, output size)
  are the worker's job.
  Bodies of ``with tracer.invoke(...)`` and ``with tracer.all()`` blocks, which glassbox defers,
  are compiled here too: ``make_globals`` puts ``compile_restricted_ast`` under
  ``capture.COMPILER_KEY`` in the job's globals, and ``capture`` compiles a deferred body with it
  and runs it in those guarded globals, so the runtime guards apply there as everywhere else.
"""

from __future__ import annotations

import ast
import builtins
import copy
import io
import linecache
import re
import types
import warnings
from collections.abc import Callable, Iterable
from types import CodeType
from typing import Any

import torch
from RestrictedPython import compile_restricted_exec
from RestrictedPython.Guards import guarded_iter_unpack_sequence, guarded_unpack_sequence
from RestrictedPython.transformer import (
    INSPECT_ATTRIBUTES,
    IOPERATOR_TO_STR,
    RestrictingNodeTransformer,
    copy_locations,
)

from ...capture import COMPILER_KEY
from ...envoy import Envoy
from ...models.generation import call_through
from ...remote.protocol import RemoteFunction
from .guards import ModuleView, Policy, SandboxError, deny

__all__ = [
    "GUARD_NAMES",
    "SandboxError",
    "compile_function",
    "compile_restricted_ast",
    "compile_restricted_source",
    "make_globals",
    "register_source",
]

GUARD_NAMES = (
    "__builtins__", "_getattr_", "_getitem_", "_write_", "_getiter_", "_iter_unpack_sequence_",
    "_unpack_sequence_", "_inplacevar_", "_apply_", "_print_", "_aug_item_", "_aug_attr_",
)


# ---------------------------------------------------------------- compiling


_LOCAL_PRIVATE = re.compile(r"_[A-Za-z0-9]\w*")


class _GlassboxTransformer(RestrictingNodeTransformer):
    """RestrictedPython's policy, plus augmented assignment to items and
    attributes (through guards), plus ``_step``-style variable names, minus
    class definitions."""

    def check_name(self, node: ast.AST, name: str | None, allow_magic_methods: bool = False) -> None:
        # `for _step in ...` is everyday code. A single leading underscore on a *variable* is
        # allowed as long as it cannot name a guard (those end in "_") or the print collector;
        # attributes starting with "_" stay refused (that check is separate).
        if (
            name is not None and _LOCAL_PRIVATE.fullmatch(name) and not name.endswith("_")
            and name + "_" not in GUARD_NAMES and name != "_print"
        ):
            return super().check_name(node, name[1:], allow_magic_methods)
        return super().check_name(node, name, allow_magic_methods)

    def visit_AugAssign(self, node: ast.AugAssign) -> Any:
        target = node.target
        if isinstance(target, ast.Name):
            return super().visit_AugAssign(node)
        op = ast.Constant(IOPERATOR_TO_STR[type(node.op)])
        if isinstance(target, ast.Subscript):
            call = ast.Call(
                func=ast.Name("_aug_item_", ast.Load()),
                args=[self.visit(target.value), self.visit(target.slice), op, self.visit(node.value)],
                keywords=[],
            )
        elif isinstance(target, ast.Attribute):
            self._check_attribute(target)
            call = ast.Call(
                func=ast.Name("_aug_attr_", ast.Load()),
                args=[self.visit(target.value), ast.Constant(target.attr), op, self.visit(node.value)],
                keywords=[],
            )
        else:  # the grammar allows nothing else
            self.not_allowed(node)
            return node
        new = ast.Expr(call)
        copy_locations(new, node)
        return new

    def _check_attribute(self, node: ast.Attribute) -> None:
        # The same checks visit_Attribute applies to reads and plain writes.
        if node.attr.startswith("_"):
            self.error(node, f'"{node.attr}" is an invalid attribute name because it starts with "_".')
        elif node.attr in INSPECT_ATTRIBUTES:
            self.error(node, f'"{node.attr}" is a restricted name, that is forbidden to access.')

    def visit_ClassDef(self, node: ast.ClassDef) -> Any:
        self.error(node, "class definitions are not allowed in remote code; use functions, dicts and lists")
        return node


def compile_restricted_source(source: str, filename: str) -> CodeType:
    """Compile ``source`` under the sandbox policy. A plain syntax error raises
    SyntaxError; a policy violation raises SandboxError listing every one."""
    with warnings.catch_warnings():
        # Source-level warnings (invalid escapes, `is` with a literal) are the user's
        # business, not the server's; under -W error they would fail the job.
        warnings.simplefilter("ignore", SyntaxWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        tree = ast.parse(source, filename, "exec")
    return _compile(tree, filename)


def compile_restricted_ast(module: ast.Module, filename: str) -> CodeType:
    """Compile an already parsed module (e.g. the body of a ``with tracer.invoke``
    block) under the same policy. ``module`` is not modified."""
    if not isinstance(module, ast.Module):
        raise TypeError(f"compile_restricted_ast takes an ast.Module, got {type(module).__name__}")
    return _compile(copy.deepcopy(module), filename)


def _compile(tree: ast.Module, filename: str) -> CodeType:
    with warnings.catch_warnings():
        # RestrictedPython reports "Prints, but never reads 'printed'" as a warning for
        # any code that prints; printing is the normal case here.
        warnings.simplefilter("ignore", SyntaxWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        result = compile_restricted_exec(tree, filename, policy=_GlassboxTransformer)
    if result.errors:
        lines = "\n  ".join(result.errors)
        raise SandboxError(f"{filename}: this code uses things remote code may not:\n  {lines}")
    assert result.code is not None
    return result.code


def register_source(filename: str, source: str) -> None:
    """Make ``source`` the text linecache returns for ``filename`` (tracebacks show the
    user's lines; glassbox finds ``with tracer.invoke`` bodies through it)."""
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)


def compile_function(fn: RemoteFunction, globals: dict) -> Callable:
    """Define the function ``fn`` carries inside the job's ``globals`` (under
    restriction) and return it. Its source must be one ``def`` of that name."""
    try:
        tree = ast.parse(fn.source)
    except SyntaxError as err:
        raise SandboxError(f"function {fn.name}() does not parse: {err}") from None
    body = tree.body
    if len(body) != 1 or not isinstance(body[0], ast.FunctionDef) or body[0].name != fn.name:
        raise SandboxError(
            f"the source sent for function {fn.name}() must be exactly one `def {fn.name}(...)`"
        )
    filename = f"<remote function {fn.name}>"
    register_source(filename, fn.source)
    exec(compile_restricted_ast(tree, filename), globals)
    return globals[fn.name]


# ---------------------------------------------------------------- globals

_SAFE_BUILTINS = (
    "abs", "all", "any", "ascii", "bin", "bool", "bytes", "callable", "chr", "complex", "dict",
    "divmod", "enumerate", "filter", "float", "format", "frozenset", "hash", "hex", "id", "int",
    "isinstance", "issubclass", "iter", "len", "list", "map", "max", "min", "next", "oct", "ord",
    "pow", "range", "repr", "reversed", "round", "set", "slice", "sorted", "str", "sum", "tuple",
    "zip", "Ellipsis", "NotImplemented",
)
_EXCEPTIONS = tuple(
    name for name, value in vars(builtins).items()
    if isinstance(value, type) and issubclass(value, Exception)
)
_BLOCKED_BUILTINS = {
    "open": "remote code has no file access; send data as variables of the trace",
    "eval": "remote code cannot compile more code", "exec": "remote code cannot compile more code",
    "compile": "remote code cannot compile more code",
    "type": "use isinstance() instead", "object": "class tricks are not available",
    "super": "class tricks are not available", "classmethod": "class tricks are not available",
    "staticmethod": "class tricks are not available", "property": "class tricks are not available",
    "vars": "introspection is not available", "dir": "introspection is not available",
    "globals": "introspection is not available", "locals": "introspection is not available",
    "setattr": "assign with `obj.name = value`", "delattr": "delete with `del obj.name`",
    "breakpoint": "there is no debugger on the server", "input": "there is no terminal on the server",
    "help": "there is no terminal on the server", "exit": "return from the trace instead",
    "quit": "return from the trace instead", "memoryview": "raw memory is not available",
    "bytearray": "raw memory is not available; use bytes", "aiter": "async code is not available",
    "anext": "async code is not available",
}

# Values the server must never hand to remote code: they reach files, processes,
# threads, the network or the interpreter itself.
_UNSAFE_MODULE_ROOTS = frozenset({
    "os", "posix", "nt", "sys", "subprocess", "socket", "ssl", "shutil", "pathlib", "io", "_io",
    "threading", "_thread", "multiprocessing", "concurrent", "asyncio", "ctypes", "_ctypes", "pickle",
    "_pickle", "marshal", "importlib", "signal", "tempfile", "glob", "urllib", "http", "requests",
    "inspect", "gc", "code", "codeop", "pdb", "runpy", "shelve", "dbm", "sqlite3", "mmap",
})
_UNSAFE_VALUES = tuple(
    getattr(builtins, n) for n in ("open", "exec", "eval", "compile", "__import__", "getattr", "setattr",
                                   "delattr", "globals", "locals", "vars", "breakpoint", "input")
)


def make_globals(
    allowed: dict[str, Any],
    *,
    print_fn: Callable[[str], None] | None = None,
    protected: Iterable[Any] = (),
) -> dict:
    """The globals to ``exec`` restricted code in: guarded builtins, RestrictedPython's
    guard functions and the ``allowed`` names. Every Envoy or module among the
    allowed values is protected (weights read-only, methods that change it
    refused), and so is everything in ``protected`` (tensors, modules, envoys).

        g = make_globals({"model": net, "x": x}, print_fn=out.append)
        exec(compile_restricted_source(src, "<job>"), g)
    """
    for name, value in allowed.items():
        if not isinstance(name, str) or not name.isidentifier() or name.startswith("_"):
            raise ValueError(f"allowed names must be identifiers not starting with '_', got {name!r}")
        _refuse_unsafe(name, value, 0)
    policy = Policy(protected, print_fn)
    policy.protect(v for v in allowed.values() if isinstance(v, (Envoy, torch.nn.Module)))
    namespace = {
        "__builtins__": _builtins(policy),
        "__name__": "__glassbox_job__",
        "_getattr_": policy.getattr,
        "_getitem_": policy.getitem,
        "_write_": policy.write,
        "_getiter_": iter,
        "_iter_unpack_sequence_": guarded_iter_unpack_sequence,
        "_unpack_sequence_": guarded_unpack_sequence,
        "_inplacevar_": policy.inplace,
        "_apply_": _apply,
        "_print_": _print_collector(policy),
        "_aug_item_": policy.aug_item,
        "_aug_attr_": policy.aug_attr,
    }
    # glassbox defers `with tracer.invoke(...)` bodies and compiles them itself; this
    # key tells it to compile them here, under the same policy.
    namespace[COMPILER_KEY] = compile_restricted_ast
    namespace.update(allowed)
    return namespace


def _builtins(policy: Policy) -> dict[str, Any]:
    table: dict[str, Any] = {name: getattr(builtins, name) for name in _SAFE_BUILTINS + _EXCEPTIONS}
    for name, why in _BLOCKED_BUILTINS.items():
        table[name] = _blocked(name, why)
    table["getattr"] = policy.getattr
    table["hasattr"] = policy.hasattr
    table["__import__"] = policy.import_module
    return table


def _blocked(name: str, why: str) -> Callable:
    def blocked(*args: Any, **kwargs: Any) -> Any:
        raise deny(f"{name}() is not available in remote code: {why}")

    blocked.__name__ = name
    return blocked


@call_through  # `with model.generate(*a, **k):` still reads as a with block
def _apply(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    # RestrictedPython routes f(*a, **k) through here; the arguments need no
    # guarding of their own (every attribute they reach is guarded).
    return fn(*args, **kwargs)


def _print_collector(policy: Policy) -> type:
    class PrintCollector:
        """``print`` inside restricted code: text goes to the job's print callback."""

        def __init__(self, _getattr_: Any = None) -> None:
            self.parts: list[str] = []

        def _call_print(self, *objects: Any, sep: str | None = " ", end: str | None = "\n",
                        file: Any = None, flush: bool = False) -> None:
            if file is not None:
                raise deny("print(file=...) is not available in remote code; print goes to your console")
            sep = " " if sep is None else sep
            text = sep.join(str(o) for o in objects) + ("\n" if end is None else end)
            self.parts.append(text)
            policy.emit(text)

        def __call__(self) -> str:  # RestrictedPython's `printed`
            return "".join(self.parts)

    return PrintCollector


def _refuse_unsafe(path: str, value: Any, depth: int) -> None:
    if depth > 8:
        return
    if isinstance(value, ModuleView):
        return
    if isinstance(value, types.ModuleType):
        raise ValueError(f"{path} is a module: remote code gets modules only through `import` (a whitelist)")
    if any(value is unsafe for unsafe in _UNSAFE_VALUES):
        raise ValueError(f"{path} is the builtin {value.__name__}, which remote code must not have")
    if isinstance(value, io.IOBase):
        raise ValueError(f"{path} is a file object: remote code must not touch files")
    if callable(value) or isinstance(value, type):
        module = getattr(value, "__module__", None) or ""
        if module.partition(".")[0] in _UNSAFE_MODULE_ROOTS:
            qualname = getattr(value, "__qualname__", "?")
            raise ValueError(f"{path} ({module}.{qualname}) reaches files, processes or the interpreter; "
                             "remote code must not have it")
    cls = type(value)
    if cls.__module__.partition(".")[0] in _UNSAFE_MODULE_ROOTS and not isinstance(value, (str, bytes)):
        raise ValueError(f"{path} is a {cls.__module__}.{cls.__qualname__}, which reaches files, processes "
                         "or the interpreter; remote code must not have it")
    if isinstance(value, dict):
        for key, item in value.items():
            _refuse_unsafe(f"{path}[{key!r}]", item, depth + 1)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for i, item in enumerate(value):
            _refuse_unsafe(f"{path}[{i}]", item, depth + 1)

