"""NNsight: wrap any ``torch.nn.Module`` for tracing.

Offers:
    NNsight    the root Envoy plus ``trace()``, ``session()``, and ``active`` (the
               interleaver of the trace open on it, or None); subclasses
               (LanguageModel) override the hooks of contract.py. ``edit()`` / ``clear_edits()``
               (editing.py) and ``scan()`` (scan.py).

Hooks a subclass may override: models/contract.py (``ModelContract``) lists every one the
tracing core, generation, editing, the server and the client call on a model, with who calls it
and when; NNsight below gives each its plain-module default.
"""

from __future__ import annotations

from typing import Any

import torch

from ..batching import Rows, concat_args
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
        trace: bool = True, **kwargs: Any,
    ) -> Any:
        """Open a trace. Inputs given here run as one batch entry; with none,
        add entries with ``tracer.invoke(...)``. Extra keyword arguments are
        passed to the model's forward. ``remote=True`` runs the block on the
        glassbox server at ``CONFIG.HOST`` (``blocking=False``: ``tracer.job``);
        ``remote="local"`` runs it as a server would, in this process.
        ``trace=False`` runs the model on the input now and returns its output."""
        tracer = Tracer(self, args, kwargs, remote=remote, timeout=timeout, blocking=blocking)
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

    def _prepare(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return tuple(args), dict(kwargs)

    def _single(self, prepared: Any) -> tuple[tuple, dict]:
        """The model call for one prepared input traced alone (no batching needed)."""
        return prepared

    def _batch(self, prepared: list[tuple[tuple, dict]], width: int = 0) -> tuple[tuple, dict, list[Rows]]:
        return concat_args(prepared)

    def _exact_rows(self, prepared: list[Any], spans: list[Rows], width: int = 0) -> list[Rows]:
        """Rows without the padding an input did not have alone; plain modules are not padded."""
        return spans

    def _execute(self, args: tuple, kwargs: dict, **call: Any) -> Any:
        return module_of(self)(*args, **kwargs)

    def _pad_id(self) -> int:
        """The token id that pads rows (plain modules are never padded: 0)."""
        return 0


set_root_class(NNsight)  # Envoy(module) is a traceable root, as in nnsight (envoy.py cannot import this)
