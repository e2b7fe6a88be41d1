"""nnsight 0.8's model-less block tracer, ``glassbox.tracing.tracer.Tracer``.

Offers:
    Tracer        ``with Tracer(backend=None) as tracer:`` captures its block, skips it where it
                  stands, and at the end of the block hands it to ``backend(tracer)``
                  (tracing/backend.py; the default runs it in place, after which the names it set
                  are the caller's, as after any block). A base for traced contexts of your own:
                  subclass it, or pass a backend that logs, ships or reruns the block.
                  ``tracer.info`` is a ``Tracer.Info`` (backend.BlockInfo): the caller's ``frame``
                  (released at exit: a tracer kept afterwards pins no frame) and the body's code.
                  The steps are methods a subclass may override: ``capture()``,
                  ``source(filename)``, ``parse(source, lineno)``, ``build(node)``,
                  ``compile(module, frame)``, ``execute(code)``.
    ExitTracingException  what the skip hook raises at the block's first line (capture.SkipBody)
    WithBlockNotFoundError  no ``with`` block at the call site (errors.py); the message says why
    save(value)   glassbox.save; inside a block tracer saving is allowed, as in a session
    _not_found_message(filename, lineno)  that message (nnsight's private name, kept for ports)

Each call site is read, parsed and compiled once (globals.py: SOURCES, BLOCKS). A block is skipped
by a line hook (capture.Skipper), so two shapes are refused on entering, with what to write: a body
on the ``with`` line itself (it would run where it stands and again through the backend), and a
body that starts with ``try:`` (CPython's ``try`` line has no exception-table entry, so the skip
would unwind the caller's frame past ``__exit__``). The model's trace (trace.py) is not built on
this class: its body runs inline, where the model meets it, and needs no capture.
"""

from __future__ import annotations

import ast
import linecache
import os
import sys
from types import CodeType, FrameType
from typing import Any

from ..capture import (
    SkipBody,
    Skipper,
    dash_c_program,
    find_with,
    header_end,
    is_trivial,
    named_as_caller,
    opens_try,
    refuse_try,
    run_in_frame,
)
from ..errors import TraceStateError, WithBlockNotFoundError
from .backend import Backend, BlockInfo, raise_clean, run_backend
from .globals import BLOCKS, SOURCES
from .saving import enter_session, exit_session, save
from .util import clean_traceback

__all__ = ["ExitTracingException", "Tracer", "WithBlockNotFoundError", "save"]

ExitTracingException = SkipBody  # nnsight's name for the exception that skips the block
_OPENERS, _CLOSERS = "([{", ")]}"


class Tracer:
    """A ``with`` block captured and run by a backend (see the module docstring)."""

    Info = BlockInfo

    def __init__(self, *, backend: Backend | None = None) -> None:
        self.backend = backend if backend is not None else Backend()
        self.info: BlockInfo | None = None
        self._skipper: Skipper | None = None

    # ------------------------------------------------------------ the block

    def __enter__(self) -> Tracer:
        node = self.capture()
        frame = self.info.frame  # type: ignore[union-attr]
        first = node.body[0]
        if is_trivial(node.body):
            return self  # nothing runs where it stands, so nothing to skip (and no line to skip on)
        if first.lineno <= header_end(node):
            raise TraceStateError(
                f"a traced block's body must start on its own line below the `with` "
                f"({frame.f_code.co_filename}:{first.lineno}): the block is skipped where it stands "
                "and run by the tracer's backend, so a body on the `with` line would run twice"
            )
        if opens_try(node.body):
            raise refuse_try(frame.f_code.co_filename, first.lineno)
        self._skipper = Skipper(frame, first.lineno)
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        skipper, self._skipper = self._skipper, None
        ran, error = run_backend(self, skipper, exc_type)
        if error is None:
            return ran
        raise_clean(error.with_traceback(clean_traceback(error.__traceback__) or error.__traceback__))

    # ------------------------------------------------------------ the steps

    def capture(self) -> ast.With | ast.AsyncWith:
        """Find the ``with`` block being entered where this tracer was called (past ``__enter__``
        methods of this tracer), set ``self.info``; return the block's node."""
        frame = sys._getframe(1)
        while frame.f_code.co_name == "__enter__" and frame.f_locals.get("self") is self:
            frame = frame.f_back  # type: ignore[assignment]
        code, lineno = frame.f_code, frame.f_lineno
        key = (code.co_filename, lineno, code.co_name, code.co_firstlineno)
        entry = BLOCKS.get(key)
        if entry is None:
            source = self.source(code.co_filename, frame.f_globals)
            node = self.parse(source, lineno) if source else None
            compiled = self.compile(self.build(node), frame) if node is not None else None
            entry = BLOCKS[key] = (node, compiled)
        node, compiled = entry
        if node is None:
            raise WithBlockNotFoundError(_not_found_message(code.co_filename, lineno))
        self.info = BlockInfo(frame, compiled)
        return node  # type: ignore[return-value]

    @staticmethod
    def source(filename: str, module_globals: dict | None = None) -> str:
        """The source of ``filename``, read once (SOURCES): a file, a notebook cell or an exec'd
        string registered in ``linecache``, or the program of ``python -c``."""
        if filename in SOURCES:
            return SOURCES[filename]
        text = dash_c_program() if filename == "<string>" else ""
        if not text:
            text = "".join(linecache.getlines(filename, module_globals))
        if text:
            SOURCES[filename] = text
        return text

    def parse(self, source: str, lineno: int) -> ast.With | ast.AsyncWith | None:
        """The ``with`` statement whose header spans ``lineno``: from a slice of the source at
        that line when it can be cut out, else from the whole file."""
        node = self._parse_block(source, lineno)
        if node is not None:
            return node
        try:
            return find_with(ast.parse(source), lineno)
        except SyntaxError:
            return None

    def _parse_block(self, source: str, lineno: int) -> ast.With | ast.AsyncWith | None:
        """The ``with`` starting on line ``lineno``, parsed from its own lines only (a large file
        need not be parsed whole), with the file's line numbers; None when the line starts no
        ``with`` or the slice does not parse on its own."""
        lines = source.splitlines(keepends=True)
        if not 1 <= lineno <= len(lines):
            return None
        head = lines[lineno - 1]
        stripped = head.lstrip()
        words = stripped.split(None, 2)
        if not words or not ((words[0].startswith("with") and words[0][4:5] in ("", "("))
                             or (words[0] == "async" and len(words) > 1 and words[1].startswith("with"))):
            return None
        indent = len(head) - len(stripped)
        block = [head[indent:]]
        depth, continued = _depth(head), head.rstrip().endswith("\\")
        in_header = depth > 0 or continued
        for line in lines[lineno:]:
            text = line.strip()
            if in_header:
                block.append(_dedent(line, indent))
                depth += _depth(line)
                in_header = depth > 0 or text.endswith("\\")
                continue
            if not text or text.startswith("#"):  # a comment may sit at any column, even inside
                block.append(_dedent(line, indent))
                continue
            if len(line) - len(line.lstrip()) <= indent:
                break
            block.append(_dedent(line, indent))
        try:
            tree = ast.parse("".join(block))
        except SyntaxError:
            return None
        if not tree.body or not isinstance(tree.body[0], (ast.With, ast.AsyncWith)):
            return None
        node = tree.body[0]
        ast.increment_lineno(node, lineno - 1)
        if indent:
            for part in ast.walk(node):  # columns as in the file, for tracebacks' markers
                if hasattr(part, "col_offset"):
                    part.col_offset += indent
                    if getattr(part, "end_col_offset", None) is not None:
                        part.end_col_offset += indent
        return node

    def build(self, node: ast.With | ast.AsyncWith) -> ast.Module:
        """The block's body as a module of its own."""
        return ast.Module(body=list(node.body), type_ignores=[])

    def compile(self, module: ast.Module, frame: FrameType) -> CodeType:
        """``module`` compiled under the caller's file name and line numbers, named after the
        caller's function, so tracebacks and debuggers show the user's own lines and function."""
        return named_as_caller(compile(module, frame.f_code.co_filename, "exec"), frame)

    def execute(self, code: CodeType) -> None:
        """Run ``code`` in the caller's namespace (``info.frame``): it reads the caller's names, and
        the names it sets are the caller's afterwards. Saving is allowed while it runs."""
        frame = self.info.frame  # type: ignore[union-attr]
        if frame is None:
            raise TraceStateError("this tracer's block has ended: execute() runs it only inside the backend")
        enter_session()
        try:
            run_in_frame(code, frame)
        finally:
            exit_session()


def _depth(line: str) -> int:
    """Brackets opened minus closed on ``line`` (strings and a trailing comment ignored roughly:
    a slice this misjudges fails to parse, and parse() falls back to the whole file)."""
    code = line.split("#", 1)[0]
    return sum(code.count(c) for c in _OPENERS) - sum(code.count(c) for c in _CLOSERS)


def _dedent(line: str, indent: int) -> str:
    spaces = len(line) - len(line.lstrip())
    return line[min(spaces, indent):] if line.strip() else "\n"


def _not_found_message(filename: str, lineno: int) -> str:
    """Why no ``with`` block was found at ``filename:lineno``, told apart by what the source is."""
    where = f"{filename}:{lineno}"
    source = Tracer.source(filename)
    if not source:
        return (
            f"no source for {filename}, so the `with` block at line {lineno} cannot be captured: a "
            "block tracer reads its block's source, and code piped to the interpreter "
            "(python < script.py), typed at a prompt without history, or exec'd from a string has "
            "none. Save the code to a file and run that file, or register an exec'd string in "
            "linecache (linecache.cache[name] = (len(src), None, src.splitlines(True), name)) "
            "under the name you compile it with."
        )
    lines = source.splitlines()
    line = lines[lineno - 1].strip() if 0 < lineno <= len(lines) else ""
    if os.path.isfile(filename):
        return (
            f"no `with` block starts at {where}; that line reads `{line}`. Either the tracer was "
            "not entered by a `with` statement (call it as `with Tracer():`), or the file was "
            "edited after this process read it and its source is stale (each file is read once, "
            "glassbox.tracing.globals.SOURCES): restart the interpreter or kernel."
        )
    return (
        f"no `with` block starts at {where}; the source registered for it in linecache reads "
        f"`{line}` there. Register the source the code was compiled from (linecache.cache), "
        "under the same name, and enter the tracer with a `with` statement."
    )
