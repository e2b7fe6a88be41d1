"""NNsight: wrap any ``torch.nn.Module`` for tracing.

Offers:
    NNsight    the root Envoy plus ``trace()``, ``session()``, and ``active`` (the
               interleaver of the trace open on it, or None); subclasses
               (LanguageModel) override the hooks of contract.py. ``edit()`` / ``clear_edits()``
               (editing.py) and ``scan()`` (scan.py).

Hooks a subclass may override: models/contract.py (``ModelContract``) lists every one the
tracing core, generation, editing, the server and the client call on a model, with who calls it
and when; NNsight below gives each its plain-module default.

nnsight 0.8's subclass hooks work unchanged: ``_batch_size(*inputs, **kwargs) -> int`` (the rows
one invoke contributes) and ``_batch(invokes, fn) -> (args, kwargs)`` (combine the invokes'
``(inputs, kwargs)``); a ``_batch`` in that form is recognised by its signature (no ``width``
parameter) and wrapped into glassbox's ``_batch(prepared, width) -> (args, kwargs, rows)``, its
rows counted with ``_batch_size``. ``model.interleave(fn, *args, **kwargs)`` runs ``fn`` on one
input with the stored edits applied.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from ..batching import Rows, _row_count, concat_args
from ..editing import EditTracer, clear_edits, edit_consumers
from ..envoy import Envoy, module_of, set_root_class
from ..errors import TraceStateError
from ..scan import ScanTracer
from ..session import Session
from ..tracing import Tracer

_REMOTE_NEEDS_NAME = "remote execution needs a glassbox.LanguageModel: the server hosts models by name"


class NNsight(Envoy):
    """Wrap a module; trace it with ordinary Python.

        net = NNsight(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()))
        with net.trace(torch.randn(2, 4)):
            out = net.output.save()
    """

    # ModelContract's class-level hooks (contract.py): a plain module's defaults
    _narrow_min_ndim = 1
    _no_gradients: str | None = None  # autograd works
    _requests_per_invoke = False  # invokes are rows of one batch
    _wire_result: Any = None  # tracer.result travels as it is
    _generator: Any = None  # no generator envoy: a generate block's result is the root's output
    # The interleaver of the trace open on this model (None: no trace is open). A plain attribute,
    # not a property: every module access reads it.
    active: Any = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("_batch")
        if own is not None and _nnsight_form(own):
            cls._batch = _adapt_batch(own)  # nnsight's _batch(invokes, fn): glassbox's form around it
            if "_single" not in cls.__dict__:  # nnsight assembles a lone input with _batch too
                cls._single = lambda self, prepared: self._batch([prepared])[:2]

    def __init__(self, module: torch.nn.Module, *, rename: dict | None = None) -> None:
        if not isinstance(module, torch.nn.Module):
            raise TypeError(
                f"NNsight wraps a torch.nn.Module, got {type(module).__name__}; for a "
                "Hugging Face model id or folder use glassbox.LanguageModel"
            )
        super().__init__(module, rename=rename)
        self.__dict__["active"] = None

    # ---------------------------------------------------------------- contexts

    def trace(
        self, *args: Any, remote: bool | str = False, timeout: float | None = None, blocking: bool = True,
        trace: bool = True, backend: Any = None, **kwargs: Any,
    ) -> Any:
        """Open a trace. Inputs given here run as one batch entry; with none,
        add entries with ``tracer.invoke(...)``. Extra keyword arguments are
        passed to the model's forward. ``remote=True`` runs the block on the
        glassbox server at ``CONFIG.HOST`` (``blocking=False``: ``tracer.job``);
        ``remote="local"`` runs it as a server would, in this process.
        ``trace=False`` runs the model on the input now and returns its output.
        ``backend=`` (nnsight's): the block is captured and, at its end, run by
        ``backend(tracer)`` (glassbox.tracing.backend.Backend), the trace open."""
        if backend is not None and (remote or not trace):
            raise ValueError("backend= runs the block of a local `with model.trace(...)`: drop "
                             "remote= / trace=False, or backend=")
        tracer = Tracer(self, args, kwargs, remote=remote, timeout=timeout, blocking=blocking,
                        backend=backend)
        return tracer if trace else tracer._run_now()

    def session(self, remote: bool | str = False, timeout: float | None = None,
                blocking: bool = True) -> Session:
        """Group several traces (values flow between them as ordinary variables);
        with ``remote=True`` the whole block is one job on the server (``"local"``: run
        as one, in this process)."""
        return Session(self, remote=remote, timeout=timeout, blocking=blocking)

    def edit(self, *, inplace: bool = False) -> EditTracer:
        """Store a block of interventions, replayed at every later trace. Without ``inplace``, on
        a new wrapper of the same module (``with model.edit() as edited:``, or nnsight's
        ``as (tracer, edited)``); with ``inplace=True``, on this one (``as tracer``)."""
        return EditTracer(self, inplace=inplace)

    def clear_edits(self) -> None:
        """Remove every edit stored on this wrapper."""
        clear_edits(self)

    def scan(self, *args: Any, **kwargs: Any) -> ScanTracer:
        """``with model.scan(input):`` a trace on fake tensors: shapes and dtypes, no compute,
        no weights loaded; fakes left in variables become meta tensors after the block."""
        return ScanTracer(self, args, kwargs)

    def interleave(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """nnsight's ``model.interleave(fn, *args, **kwargs)``: run ``fn(*args, **kwargs)`` (a
        callable, or the name of a method of the wrapped module) as a trace with no body: the
        inputs go through ``_prepare`` and the stored edits apply; returns what ``fn`` returned."""
        if isinstance(fn, str):
            fn = getattr(module_of(self), fn)
        tracer = Tracer(self, args, kwargs)

        def task(interleaver: Any, a: tuple, k: dict) -> Any:
            return lambda: interleaver.run_task(lambda: fn(*a, **k))

        tracer._task = task  # type: ignore[method-assign]
        return tracer._run_now()

    def _default_consumers(self, interleaver: Any, tracer: Any) -> Any:
        return edit_consumers(self, tracer)

    def _remote_name(self) -> str:
        raise TraceStateError(_REMOTE_NEEDS_NAME)

    def _run_remotely(self, method: str, body: Any, frame: Any, inputs: list, call: dict, *,
                      timeout: float | None, blocking: bool, local: bool = False) -> Any:
        raise TraceStateError(_REMOTE_NEEDS_NAME)

    def _envoy_of(self, module: Any) -> Envoy:
        """The envoy of an envoy, a submodule, or a path ("layers.0", or nnsight's "model.layers.0")."""
        if isinstance(module, Envoy):
            return module
        if isinstance(module, str):
            found = self.get(module)
            if isinstance(found, Envoy):
                return found
            raise TraceStateError(f"{module!r} names a value, not a submodule of this model")
        for envoy in self.modules():
            if module_of(envoy) is module:
                return envoy
        raise TraceStateError(f"{type(module).__name__} is not a submodule of this model")

    def _missed_hint(self, envoy: Envoy) -> str | None:
        """Advice for a module that never ran (subclasses know their models)."""
        return None

    # ---------------------------------------------------------------- input hooks

    def _ensure_ready(self) -> None:
        pass

    def _holds_input(self, kwargs: dict) -> bool:
        return True  # a plain module may take its input by keyword

    def _prepare(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return tuple(args), dict(kwargs)

    def _single(self, prepared: Any) -> tuple[tuple, dict]:
        """The model call for one prepared input traced alone (no batching needed)."""
        return prepared

    def _batch_size(self, *inputs: Any, **kwargs: Any) -> int:
        """nnsight's hook: the rows one invoke's input contributes (a plain module: the first
        tensor's leading dimension, else 1; nnsight counts 1 per input)."""
        return _row_count(inputs, kwargs) if (inputs or kwargs) else 0

    def _batch(self, prepared: list[tuple[tuple, dict]], width: Any = 0) -> Any:
        """Several prepared inputs -> ``(args, kwargs, [Rows])``. Called in nnsight's form,
        ``_batch(invokes, fn)`` (a subclass's ``super()._batch``), it returns ``(args, kwargs)``."""
        args, kwargs, rows = concat_args(prepared)
        if not isinstance(width, int):  # nnsight's (invokes, fn)
            return args, kwargs
        if type(self)._batch_size is not NNsight._batch_size:
            rows = _rows(self, prepared)
        return args, kwargs, rows

    def _exact_rows(self, prepared: list[Any], spans: list[Rows], width: int = 0) -> list[Rows]:
        """Rows without the padding an input did not have alone; plain modules are not padded."""
        return spans

    def _execute(self, args: tuple, kwargs: dict, **call: Any) -> Any:
        return module_of(self)(*args, **kwargs)

    def _pad_id(self) -> int:
        """The token id that pads rows (plain modules are never padded: 0)."""
        return 0


def _nnsight_form(batch: Any) -> bool:
    """A ``_batch`` written for nnsight 0.8: ``(self, invokes, fn)``, no ``width``."""
    try:
        params = inspect.signature(batch).parameters
    except (TypeError, ValueError):
        return False
    return "width" not in params and len(params) >= 3


def _rows(model: Any, prepared: list[tuple[tuple, dict]]) -> list[Rows]:
    rows, start = [], 0
    for args, kwargs in prepared:
        count = model._batch_size(*args, **kwargs)
        rows.append(Rows(start, start + count))
        start += count
    return rows


def _adapt_batch(batch: Any) -> Any:
    """Glassbox's ``_batch(prepared, width)`` around a subclass's nnsight ``_batch(invokes, fn)``."""

    def _batch(self: Any, prepared: list, width: Any = 0) -> Any:
        if not isinstance(width, int):  # called in nnsight's form (a further subclass's super())
            return batch(self, prepared, width)
        args, kwargs = batch(self, [(tuple(a), dict(k)) for a, k in prepared], "__call__")
        return tuple(args), dict(kwargs), _rows(self, prepared)

    _batch.__wrapped__ = batch  # type: ignore[attr-defined]
    _batch.__doc__ = batch.__doc__
    return _batch


set_root_class(NNsight)  # Envoy(module) is a traceable root, as in nnsight (envoy.py cannot import this)
