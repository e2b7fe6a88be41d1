"""Saving and the per-thread trace state: what ``.save()`` checks, and where it is mounted.

Offers:
    STATE             per-thread state: ``stack`` (open traces, innermost last), ``collector``
                      (collect_saved's record), ``sessions`` (open local sessions)
    push(tracer) / pop(tracer) / current_tracer()   the stack of open traces
    save(x)           keep ``x`` after the trace (identity locally; remote traces send back
                      exactly the saved values); raises TraceStateError outside a trace
    tensor_save(x)    what ``x.save()`` runs, once mounted
    ensure_mounted()  at the first trace, session or ``collect_saved``: ``Tensor.save``,
                      ``Tensor.backward`` and ``save`` on Python's value types
    enter_session() / exit_session()   a local session (saving allowed between traces)
    collect_saved()   every value saved in this thread while it is open
"""

from __future__ import annotations

import sys
import threading
from typing import Any

from ..backward import patched_backward, use_tracer_finder
from ..envoy import set_save, set_tracer_finder
from ..errors import TraceStateError
from ..patches import mount, mount_builtin


class _ThreadState(threading.local):
    """Per-thread trace state. Attributes are set in ``__init__`` (run once per thread), so reads
    never take the slow path of a missing attribute: ``.save()`` is on the per-access path."""

    def __init__(self) -> None:
        self.stack: list[Any] = []  # open traces, innermost last
        self.collector: dict[int, Any] | None = None  # collect_saved's record, while one is open
        self.sessions = 0  # open local sessions


STATE = _ThreadState()


def current_tracer() -> Any:
    """The innermost open trace in this thread, if any."""
    stack = STATE.stack
    return stack[-1] if stack else None


use_tracer_finder(current_tracer)
set_tracer_finder(current_tracer)  # the deprecated model.iter / model.all() (envoy.py cannot import this)


_SAVE_OUTSIDE = (
    "save() was called outside a trace: .save() / glassbox.save() belong inside `with "
    "model.trace(...)` (or model.generate, model.session), where they mark a value to keep after "
    "the block. Outside a trace every value is already yours: use it directly, or move this line "
    "into the block."
)


def save(value: Any) -> Any:
    """Mark ``value`` (any value: tensors, lists, dicts, numbers...) to be kept after the
    trace and return it unchanged; outside a trace it raises TraceStateError.

        with model.trace(x):
            hidden = glassbox.save(model.layer.output)
    """
    return tensor_save(value)


def enter_session() -> None:
    """A local ``model.session()`` opened in this thread: saving between its traces is allowed
    (a remote session saves there too), so ``[].save()`` must exist from its first line."""
    ensure_mounted()
    STATE.sessions += 1


def exit_session() -> None:
    STATE.sessions -= 1


class collect_saved:
    """Record every value saved in this thread while the block runs (a server
    job returns exactly these, across all the traces of a session)."""

    def __enter__(self) -> dict[int, Any]:
        ensure_mounted()  # a job's block may call [].save() before its first trace opens
        self.previous = STATE.collector
        STATE.collector = {}
        return STATE.collector

    def __exit__(self, *exc: Any) -> None:
        STATE.collector = self.previous


def tensor_save(self: Any) -> Any:
    """``x.save()``: on tensors, model outputs and Python's value types once the first trace has
    mounted it (``ensure_mounted``); valid while a trace is open."""
    # on the per-access path: the common local case (a trace open, nobody collecting) is two
    # attribute reads. Locally the value is simply kept by the caller's name; only a collector (a
    # server job) records what was saved.
    state = STATE
    collector = state.collector
    if collector is not None:
        collector[id(self)] = self  # held, so the id stays this object's
    elif not state.stack and not state.sessions:
        raise TraceStateError(_SAVE_OUTSIDE)
    return self


set_save(tensor_save)  # SavableTuple.save (envoy.py cannot import this module: it is imported by it)

_mount_lock = threading.Lock()
_tensor_mounted = False
_model_output_mounted = False
# save on Python's value types (containers, numbers, strings, bytes: what a block builds or reads,
# e.g. `output.shape[0].save()`): mounted with Tensor.save at the first trace, never at import
# (importing a library should change no builtin); from then on, outside a trace `[].save()` says
# what to do. Not on `object`, as nnsight does: every class that forwards unknown attributes
# through __getattr__ (a proxy, a wrapper) would find object.save instead of forwarding `save`.
_SAVABLE_BUILTINS = (list, dict, set, frozenset, tuple, int, float, complex, str, bytes)
_builtins_savable = False


def ensure_mounted() -> None:
    """At the first trace (or session, or ``collect_saved``), mount ``Tensor.save``,
    ``Tensor.backward`` and ``save`` on Python's value types (list, dict, set, tuple, int, float,
    str, bytes, ...: ``_SAVABLE_BUILTINS``) for the rest of the process (and ``ModelOutput.save``
    once transformers is imported, where ``dict.save`` does not cover it: a Python that refuses to
    patch builtins). Before that nothing is patched. Outside a trace
    ``.save()`` raises TraceStateError saying what to do, and ``backward`` is torch's own
    (patched_backward passes straight through when no trace is open). Mounted for good, not per
    trace: writing an attribute of ``torch.Tensor`` invalidates the interpreter's method caches
    for every tensor method, which cost every trace 2-5 µs."""
    global _tensor_mounted, _model_output_mounted, _builtins_savable
    if _tensor_mounted and (_model_output_mounted or _builtins_savable):
        return  # every trace after the first
    with _mount_lock:
        if not _tensor_mounted:
            import torch

            mount(torch.Tensor, "save", tensor_save)
            mount(torch.Tensor, "backward", patched_backward)
            _builtins_savable = mount_builtin(_SAVABLE_BUILTINS, "save", tensor_save)
            _tensor_mounted = True
        generic = sys.modules.get("transformers.utils.generic")
        if generic is not None and not _model_output_mounted and not _builtins_savable:
            mount(generic.ModelOutput, "save", tensor_save)
            _model_output_mounted = True


def push(tracer: Any) -> None:
    STATE.stack.append(tracer)


def pop(tracer: Any) -> None:
    stack = STATE.stack
    if stack and stack[-1] is tracer:
        stack.pop()
    elif tracer in stack:
        stack.remove(tracer)
