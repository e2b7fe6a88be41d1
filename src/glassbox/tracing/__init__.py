"""Traces and captured blocks.

Offers:
    trace.py    the model's trace: ``Tracer`` (``with model.trace(...)``), ``Invoker``,
                ``Body`` / ``run_together`` (re-exported here: ``from glassbox.tracing import
                Tracer`` is the model's trace)
    saving.py   ``save``, ``x.save()`` and where it is mounted, ``collect_saved``, sessions, the
                stack of open traces (re-exported here)
    tracer.py   nnsight 0.8's model-less block tracer (``glassbox.tracing.tracer.Tracer``):
                ``with Tracer(backend=...):`` captures its block and hands it to a backend
    backend.py  ``Backend``: what running a captured block means (the default runs it in place)
    globals.py  ``SOURCES`` and ``BLOCKS``: the block tracer's process-wide source and code caches
    util.py     ``filter_traceback`` / ``clean_traceback``: a traceback without glassbox's frames

The module names are nnsight's (``nnsight.tracing.tracer`` and the rest), so ported code that
imports them, or subclasses the block tracer or a backend, runs unchanged.
"""

from .saving import collect_saved, current_tracer, enter_session, exit_session, save, tensor_save
from .trace import Body, Invoker, Tracer, remote_where, run_together

__all__ = [
    "Body",
    "Invoker",
    "Tracer",
    "collect_saved",
    "current_tracer",
    "enter_session",
    "exit_session",
    "remote_where",
    "run_together",
    "save",
    "tensor_save",
]
