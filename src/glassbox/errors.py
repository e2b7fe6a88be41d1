"""Exceptions that glassbox raises at the user's own line.

Offers:
    GlassboxError       base class of everything below
    OutOfOrderError     a module was asked for after the model had passed it
    MissedModuleError   a module was asked for but never ran in this forward
    TraceStateError     an API was used where it cannot work (outside a trace,
                        from another thread, after tracer.stop(), ...)
    SandboxError        remote code tried something the server does not allow
"""

from __future__ import annotations


class GlassboxError(Exception):
    """Base class of glassbox's own errors."""


class TraceStateError(GlassboxError):
    """An intervention API was used where it cannot work; the message says where it can."""


class OutOfOrderError(GlassboxError):
    """A module boundary was requested after the model had already passed it.

    Within one invoke, modules must be accessed in the order the model runs
    them: read ``layers[3].output`` before ``layers[5].output``.
    """


class MissedModuleError(GlassboxError):
    """A module was requested but the forward finished without ever running it."""


class SandboxError(GlassboxError):
    """Remote code tried something the server's sandbox does not allow; the message says what instead."""
