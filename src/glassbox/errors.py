"""Exceptions that glassbox raises at the user's own line.

Offers:
    GlassboxError       base class of everything below
    OutOfOrderError     a module was asked for after the model had passed it
    MissedModuleError   a module was asked for but never ran in this forward
    TraceStateError     an API was used where it cannot work (outside a trace,
                        from another thread, after tracer.stop(), ...)
    SandboxError        remote code tried something the server does not allow
    RemoteError         a remote run failed: no server, a refused request
                        (``status_code``: the HTTP status), a time-out, or a
                        job that failed with an exception type that is not a
                        builtin or one of the above
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


class RemoteError(GlassboxError):
    """A remote run failed; the message says what went wrong and what to do about it.
    ``status_code`` is the HTTP status when the server refused a request (401, 404, 429, ...)."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
