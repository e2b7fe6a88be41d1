"""Turn the body of a ``with`` block into code that runs later.

Offers:
    capture_body(frame, marker)  -> CapturedBody | None
        the block whose ``with`` line is executing in ``frame`` (compiled once
        per call site, with its original file name and line numbers, so
        tracebacks and pdb point at the user's lines); None without source.
    skip_body(frame)             make the interpreter skip that block: the
        first line event in ``frame`` raises SkipBody, which the context
        manager's ``__exit__`` swallows (after ``disarm()``, which gives the
        thread back its own tracer, if it had one: a debugger's, coverage's).
    Skipper(frame, first_line)   the hook itself, for a block found another way
    write_back(frame, names)     publish names set by the deferred body into
        the caller's variables.
    run_in_frame(code, frame)    run a captured block's code in the caller's namespace now
        (the names it sets are the caller's afterwards)
    dash_c_program()             the source of a ``python -c`` program (its blocks have no
        other: with it, ``python -c`` code batches its invokes like a file)
    find_with(tree, lineno) / header_end(node) / is_trivial(body) / opens_try(body)
        the ``with`` statement being entered at a line, and what decides how it can be skipped
        (also the block tracer's: tracing/tracer.py)
    refuse_try(filename, line)   the error for a block that opens with ``try:``
    named_as_caller(code, frame) ``code`` named after ``frame``'s function (tracebacks)

Only deferred bodies need this (several ``tracer.invoke`` blocks that share
one batched forward, per-step ``tracer.all()`` blocks, remote traces); plain
trace bodies run inline as ordinary Python.
"""

from __future__ import annotations

import ast
import builtins
import ctypes
import functools
import linecache
import sys
import textwrap
import threading
from dataclasses import dataclass
from types import CodeType, FrameType
from typing import Any

from .errors import TraceStateError


class SkipBody(Exception):
    """Raised at the first line of a captured block so it does not run inline."""


@dataclass
class CapturedBody:
    code: CodeType
    source: str
    filename: str
    first_line: int
    reads: frozenset[str]
    writes: tuple[str, ...]
    target: str | None = None  # the name after `as`, if any
    loads: frozenset[str] = frozenset()  # names whose value the body uses (for remote)
    trivial: bool = False  # only `pass` / constants: nothing to skip (and no line event to skip on)
    opens_try: bool = False  # its first statement is `try:`, where a skip cannot land (skip_body)

    def namespace(self, frame: FrameType) -> dict[str, Any]:
        """A fresh globals dict for running the body: the names it reads, as
        they are in ``frame`` right now (loop variables keep this iteration's value)."""
        f_globals, f_locals = frame.f_globals, frame.f_locals
        if COMPILER_KEY in f_globals:  # restricted code: keep its guards and builtins
            ns = {k: v for k, v in f_globals.items() if k.startswith("_")}
        else:
            ns = {"__builtins__": builtins, "__name__": f_globals.get("__name__")}
        for name in self.reads:
            if name in f_locals:
                ns[name] = f_locals[name]
            elif name in f_globals:
                ns[name] = f_globals[name]
        return ns


# A frame whose globals hold this key runs restricted code (a server job): its
# deferred bodies are compiled with that function instead of `compile`.
COMPILER_KEY = "__glassbox_compile__"

_cache: dict[tuple[Any, ...], CapturedBody | None] = {}
_cache_lock = threading.Lock()


def capture_body(frame: FrameType, marker: str = "") -> CapturedBody | None:
    """The compiled body of the ``with`` statement now entering in ``frame``."""
    filename = frame.f_code.co_filename
    lines = linecache.getlines(filename, frame.f_globals)
    if not lines and filename == "<string>":
        lines = dash_c_program().splitlines(keepends=True)
    if not lines:
        return None
    lineno = frame.f_lineno
    compiler = frame.f_globals.get(COMPILER_KEY)
    key = (filename, lineno, hash(tuple(lines)), marker, compiler)
    with _cache_lock:
        if key in _cache:
            return _cache[key]
    body = _compile(lines, filename, lineno, marker, compiler)
    with _cache_lock:
        _cache[key] = body
    return body


@functools.cache  # the program a process runs does not change (forks share it)
def dash_c_program() -> str:
    """The program of ``python -c PROGRAM``, whose code is named ``<string>`` and has no source in
    linecache (read from /proc/self/cmdline; "" elsewhere, or when this is not such a process)."""
    if not sys.argv or sys.argv[0] != "-c":
        return ""
    try:
        with open("/proc/self/cmdline", "rb") as handle:
            parts = handle.read().split(b"\0")
    except OSError:  # not Linux
        return ""
    for i, part in enumerate(parts[:-1]):
        if part == b"-c":
            return parts[i + 1].decode(errors="replace")
    return ""


def _compile(lines: list[str], filename: str, lineno: int, marker: str, compiler: Any) -> CapturedBody | None:
    source = "".join(lines)
    try:
        tree = ast.parse(source, filename)
    except SyntaxError:
        return None
    node = find_with(tree, lineno)
    if node is None or node.body[0].lineno <= header_end(node):
        return None  # one-line `with x: body`: no line event to skip on
    header = ast.get_source_segment(source, node.items[0].context_expr) or ""
    if marker and marker not in header:
        return None
    module = ast.Module(body=node.body, type_ignores=[])
    code = compiler(module, filename) if compiler is not None else compile(module, filename, "exec")
    reads, writes, loads = _names(node.body)
    # the body's own lines, dedented: a remote trace ships them and the server keeps
    # their line numbers, so errors there point at the user's lines
    last = max(getattr(stmt, "end_lineno", None) or stmt.lineno for stmt in node.body)
    body_source = textwrap.dedent("".join(lines[node.body[0].lineno - 1 : last]))
    trivial = is_trivial(node.body)
    target = node.items[0].optional_vars
    return CapturedBody(
        code, body_source, filename, node.body[0].lineno, reads, writes,
        target=target.id if isinstance(target, ast.Name) else None, loads=loads, trivial=trivial,
        opens_try=opens_try(node.body),
    )


def header_end(node: ast.With | ast.AsyncWith) -> int:
    """The last line of a ``with`` statement's header (its items and ``as`` targets)."""
    ends = [node.lineno]
    for item in node.items:
        ends.append(item.context_expr.end_lineno or node.lineno)
        if item.optional_vars is not None:
            ends.append(item.optional_vars.end_lineno or node.lineno)
    return max(ends)


def find_with(tree: ast.AST, lineno: int) -> ast.With | ast.AsyncWith | None:
    """The innermost ``with`` statement of ``tree`` whose header spans line ``lineno``."""
    best = None
    for node in ast.walk(tree):
        if isinstance(node, (ast.With, ast.AsyncWith)) and node.lineno <= lineno <= header_end(node):
            if best is None or node.lineno >= best.lineno:
                best = node
    return best


def is_trivial(body: list[ast.stmt]) -> bool:
    """Only ``pass`` and constants: nothing to skip, and no line event to skip on."""
    return all(isinstance(s, ast.Pass) or (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))
               for s in body)


def opens_try(body: list[ast.stmt]) -> bool:
    """Whether the block's first statement is ``try:``, where a skip cannot land (refuse_try)."""
    return type(body[0]).__name__ in ("Try", "TryStar")


def refuse_try(filename: str, line: int) -> TraceStateError:
    """CPython gives a ``try`` line an instruction that no exception handler covers, so a skip
    raised there would leave the caller's whole function (past the ``with``'s ``__exit__``)."""
    return TraceStateError(
        f"this block cannot start with `try:` ({filename}:{line}): it is run later (an invoke, "
        "tracer.all(), an edit, a remote trace, a backend) and skipped where it stands, which Python "
        "cannot do at a `try` line. Put a statement before the `try` (even `pass`), or the `try` "
        "around the `with`."
    )


def named_as_caller(code: CodeType, frame: FrameType) -> CodeType:
    """``code`` named after the function running in ``frame``, as tracebacks show it."""
    caller = frame.f_code
    return code.replace(co_name=caller.co_name, co_qualname=getattr(caller, "co_qualname", caller.co_name))


def _names(body: list[ast.stmt]) -> tuple[frozenset[str], tuple[str, ...], frozenset[str]]:
    reads: set[str] = set()
    loads: set[str] = set()
    writes: list[str] = []
    for stmt in body:
        for node in ast.walk(stmt):
            if isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Name):
                loads.add(node.target.id)
            if isinstance(node, ast.Name):
                if isinstance(node.ctx, ast.Load):
                    reads.add(node.id)
                    loads.add(node.id)
                elif node.id not in writes:
                    writes.append(node.id)
                    reads.add(node.id)  # `x += 1` and conditional writes read it too
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if node.name not in writes:
                    writes.append(node.name)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                for alias in node.names:
                    name = (alias.asname or alias.name).split(".")[0]
                    if name not in writes:
                        writes.append(name)
    return frozenset(reads), tuple(writes), frozenset(loads)


# ------------------------------------------------------------------ skipping


class Skipper:
    """Armed line tracer that skips one block; the context manager's ``__exit__`` calls
    ``disarm()`` (also when the block produced no line event: a body of only ``pass`` has none)."""

    def __init__(self, frame: FrameType, first_line: int = 0) -> None:
        self.frame: FrameType | None = frame
        self.first_line = first_line  # header lines before it (`... as tracer:`) must still run
        self.previous_global = sys.gettrace()
        self.previous_local = frame.f_trace
        self.armed = True
        frame.f_trace = self._local_trace
        if self.previous_global is None:
            sys.settrace(_no_trace)

    def _local_trace(self, frame: FrameType, event: str, arg: Any) -> Any:
        if event == "line" and frame.f_lineno >= self.first_line:
            self._unhook()
            # CPython turns tracing off for the thread when a trace function raises, so the
            # thread's own tracer (a debugger's, coverage's) is set back in disarm()
            raise SkipBody()
        return self._local_trace

    def _unhook(self) -> None:
        frame = self.frame
        if frame is not None:
            self.frame = None
            frame.f_trace = self.previous_local

    def disarm(self) -> None:
        self._unhook()
        if self.armed:
            self.armed = False
            sys.settrace(self.previous_global)


def skip_body(frame: FrameType, body: CapturedBody) -> Skipper:
    """Arrange for ``body``, the block now being entered in ``frame``, to be skipped (a body that
    starts with ``try:`` is refused: refuse_try)."""
    if body.opens_try:
        raise refuse_try(body.filename, body.first_line)
    return Skipper(frame, body.first_line)


def _no_trace(frame: FrameType, event: str, arg: Any) -> None:
    return None


# ------------------------------------------------------------------ write back

_locals_to_fast = getattr(ctypes.pythonapi, "PyFrame_LocalsToFast", None)


def write_back(frame: FrameType, values: dict[str, Any]) -> None:
    """Set ``values`` as variables of ``frame`` (module, class or function scope)."""
    if not values:
        return
    frame.f_locals.update(values)  # module/class/exec scope: the real namespace
    optimized = frame.f_code.co_flags & 0x1  # CO_OPTIMIZED: a function's fast locals
    if optimized and sys.version_info < (3, 13) and _locals_to_fast is not None:
        _locals_to_fast(ctypes.py_object(frame), ctypes.c_int(0))


def run_in_frame(code: CodeType, frame: FrameType) -> None:
    """Run ``code`` reading ``frame``'s names; the names it sets become ``frame``'s."""
    f_globals = frame.f_globals
    if frame.f_locals is f_globals:  # module scope: its namespace is the globals
        exec(code, f_globals)
        return
    before = frame.f_locals
    names = dict(before)
    exec(code, f_globals, names)
    write_back(frame, {k: v for k, v in names.items() if before.get(k, _UNSET) is not v})


_UNSET = object()
