"""Persistent edits: ``model.edit()`` blocks replayed at every later trace.

Offers:
    EditTracer        what ``model.edit(inplace=False)`` returns: entering it captures the
                      block (it does not run now) and stores it as an Edit on the edited
                      wrapper. Binds ``as edited`` (``inplace=True``: ``as tracer``) or, like
                      nnsight 0.8, ``as (tracer, edited)`` (read from the caller's bytecode).
    Edit              one stored block: its code, a snapshot of the names it reads, a label
    edited_copy(model)  a new root wrapper over the SAME torch module (weights shared) with
                      its own list of edits
    edit_consumers(model, tracer)  the consumers replaying ``model``'s edits in one trace
                      (``NNsight._default_consumers``); () when it has none
    clear_edits(model)

How an edit runs: every trace of the edited wrapper (``trace``, ``generate``, ``trace=False``,
invokes, ``scan``) starts each stored block as a Consumer greenlet over the whole batch
(``rows=None``), added before the user's own bodies, so at a shared boundary the edit is
served first. At replay the names that meant the edited model (the wrapper ``edit()`` was
called on, the edited copy, or their submodules) mean the wrapper being traced, and the
edit's tracer means the running tracer, so ``for _ in tracer.iter[:]`` in an edit applies at
every generation step. The body runs in a fresh copy of its snapshot: names it assigns are
never written back.
"""

from __future__ import annotations

import dis
import sys
from typing import Any

from .capture import SkipBody, capture_body, skip_body
from .envoy import Envoy, module_of, name_of, path_of, rebind, rename_of, root_of
from .errors import TraceStateError, TraceStopped
from .intercept import Consumer

_EDITS = "_edits"  # the key, in a root wrapper's __dict__, of the list of its Edits


class _Tracer:
    """Placeholder, in a stored namespace, for the edit's tracer: the running tracer at replay."""


class _At:
    """Placeholder for a submodule (or the root, path "") of the edited model."""

    __slots__ = ("path",)

    def __init__(self, path: str) -> None:
        self.path = path


_TRACER = _Tracer()


class Edit:
    """One ``model.edit()`` block, stored: compiled code, the names it reads (wrappers of the
    edited model replaced by placeholders, so an edit holds no reference to any model), and
    where it was written."""

    def __init__(self, code: Any, namespace: dict[str, Any], label: str) -> None:
        self.code = code
        self.namespace = namespace
        self.label = label
        self.placeholders = [name for name, value in namespace.items() if _has_placeholder(value)]

    def consumer(self, model: Any, tracer: Any) -> Consumer:
        """A consumer that runs this block against ``model`` in the trace of ``tracer``."""
        ns = dict(self.namespace)  # a fresh copy per replay: repeated traces never accumulate
        for name in self.placeholders:
            ns[name] = _resolve(ns[name], model, tracer)
        code, label = self.code, self.label

        def run(_start: Any = None) -> None:
            try:
                exec(code, ns)
            except TraceStopped:  # a loop or tracer.stop() ended the edit's block (iteration.py)
                pass
            except Exception as exc:  # GreenletExit (cleanup) is a BaseException and passes
                where = f" at line {line}" if (line := _line_in(exc, code)) else ""
                exc.add_note(f"(raised{where} in {label}; model.clear_edits() removes stored edits)")
                raise

        return Consumer(label, None, run)


class EditTracer:
    """``with model.edit() as edited:`` — store the block as an edit instead of running it.

        with model.edit() as edited:
            model.transformer.h[0].attn.output[0][:] = 0
        with edited.trace(ids):
            out = edited.output.save()          # the edit applies; ``model`` is unchanged
    """

    def __init__(self, model: Any, *, inplace: bool = False) -> None:
        self.model = model
        self.inplace = inplace
        self.edited = model if inplace else None  # the wrapper the edit is stored on
        self._frame: Any = None
        self._body: Any = None
        self._skipper: Any = None

    def __enter__(self) -> Any:
        model = self.model
        if model.active is not None:
            raise TraceStateError(
                "model.edit() stores a block for later traces: open it outside any trace of the model"
            )
        frame = sys._getframe(1)
        body = capture_body(frame, "edit")
        if body is None:
            raise TraceStateError(
                "model.edit() needs the source of its block: write `with model.edit(...):` with the "
                "block on lines of their own below it, in a file, a notebook cell or anything linecache "
                "can read (not python -c): the block is stored and replayed at every later trace"
            )
        unpack = _unpacks(frame)
        if unpack not in (None, 2):
            raise TraceStateError(
                f"model.edit() binds one name or two, `as (tracer, edited)`; this `with` unpacks {unpack}"
            )
        if self.edited is None:
            self.edited = edited_copy(model)
        self._frame, self._body = frame, body
        if not body.trivial:  # armed last: nothing may raise after it, or the caller's next line is skipped
            self._skipper = skip_body(frame, body)
        if unpack is None:
            return self if self.inplace else self.edited
        return self, self.edited

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        frame, body, skipper = self._frame, self._body, self._skipper
        self._frame = self._body = self._skipper = None
        if skipper is not None:
            skipper.disarm()
        if exc_type is not None and exc_type is not SkipBody:
            return False
        if body is not None and not body.trivial:
            edits = stored(self.edited)
            # snapshot now, after the `as` names are bound: the values the body reads at this line
            namespace = self._portable(body.namespace(frame))
            label = f"edit {len(edits)} made at {body.filename}:{body.first_line}"
            edits.append(Edit(body.code, namespace, label))
        return exc_type is SkipBody

    def _portable(self, namespace: dict[str, Any]) -> dict[str, Any]:
        """``namespace`` with this tracer and the edited model's wrappers as placeholders."""
        roots = {id(self.model), id(self.edited)}
        module = module_of(self.model)

        def convert(value: Any) -> Any:
            if value is self:
                return _TRACER
            if isinstance(value, Envoy):
                root = root_of(value)
                if id(root) in roots or module_of(root) is module:
                    return _At(path_of(value))
            if type(value) in (list, tuple) and any(isinstance(v, Envoy) for v in value):
                return type(value)(convert(v) for v in value)
            return value

        return {name: convert(value) for name, value in namespace.items()}


def stored(model: Any) -> list[Edit]:
    """The list of ``model``'s edits (created empty on first use)."""
    edits = model.__dict__.get(_EDITS)
    if edits is None:
        edits = model.__dict__[_EDITS] = []
    return edits


def clear_edits(model: Any) -> None:
    model.__dict__.pop(_EDITS, None)


def edit_consumers(model: Any, tracer: Any) -> list[Consumer] | tuple[()]:
    edits = model.__dict__.get(_EDITS)
    if not edits:
        return ()  # every trace asks: the common case stays one dict lookup
    return [edit.consumer(model, tracer) for edit in edits]


def refuse_remote(model: Any) -> None:
    """Edits run in this process only: a remote block would silently run without them."""
    edits = model.__dict__.get(_EDITS)
    if edits:
        raise TraceStateError(
            f"this model has {len(edits)} stored edit(s) (model.edit()), which run locally only: the "
            "server would run the block without them. Trace the unedited wrapper (the one you called "
            ".edit() on, or call model.clear_edits()) and put the edit's lines at the start of the "
            "remote block instead."
        )


# ---------------------------------------------------------------- the edited copy


def edited_copy(model: Any) -> Any:
    """A new root wrapper of ``type(model)`` over the same torch module: its own envoy tree
    (so its traces are its own), the model's other state shared, a copy of its edits."""
    copy = object.__new__(type(model))
    Envoy.__init__(copy, module_of(model), rename=rename_of(model))
    tree = set(copy.__dict__)
    for key, value in model.__dict__.items():
        if key in tree or key in ("_ensure_ready", _EDITS):
            continue  # the envoy tree and its interception state (its slots) belong to each wrapper
        if isinstance(value, Envoy) and root_of(value) is model:
            # an envoy outside the tree (LanguageModel.generator): the copy gets its own
            # (tree envoys and aliases are keys Envoy.__init__ already set)
            value = type(value)(module_of(value), copy, name_of(value))
        copy.__dict__[key] = value
    copy.__dict__["active"] = None
    copy.__dict__[_EDITS] = list(model.__dict__.get(_EDITS) or ())
    # A lazily loaded model (LanguageModel before its first trace) loads its weights once, for
    # both wrappers: the copy asks the original, then points its envoys at the loaded modules.
    # An instance attribute shadows the class's hook for this wrapper only.
    copy.__dict__["_ensure_ready"] = lambda: _follow(copy, model)
    return copy


def _follow(copy: Any, source: Any) -> None:
    source._ensure_ready()
    module = module_of(source)
    if module_of(copy) is not module:
        rebind(copy, module)


# ---------------------------------------------------------------- helpers


def _has_placeholder(value: Any) -> bool:
    if isinstance(value, (_Tracer, _At)):
        return True
    return type(value) in (list, tuple) and any(isinstance(v, (_Tracer, _At)) for v in value)


def _line_in(exc: BaseException, code: Any) -> int | None:
    """The line of the edit's block where ``exc`` was raised (its innermost frame there)."""
    line, tb = None, exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code is code:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _resolve(value: Any, model: Any, tracer: Any) -> Any:
    if value is _TRACER:
        return tracer
    if isinstance(value, _At):
        node = model
        for part in value.path.split(".") if value.path else ():
            try:
                node = node[part]
            except KeyError:
                node = getattr(node, part)  # an envoy outside the tree (LanguageModel.generator)
        return node
    if type(value) in (list, tuple):
        return type(value)(_resolve(v, model, tracer) for v in value)
    return value


_unpack_counts: dict[tuple[Any, int], int | None] = {}


def _unpacks(frame: Any) -> int | None:
    """How many names the ``with`` now entering in ``frame`` unpacks its value into
    (``as (a, b)``: 2), None for ``as name`` or no ``as``. Read from the bytecode."""
    key = (frame.f_code, frame.f_lasti)
    if key not in _unpack_counts:
        following = (i for i in dis.get_instructions(frame.f_code) if i.offset > frame.f_lasti)
        after = next(following, None)
        _unpack_counts[key] = after.arg if after is not None and after.opname == "UNPACK_SEQUENCE" else None
    return _unpack_counts[key]
