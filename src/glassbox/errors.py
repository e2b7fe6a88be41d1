"""Exceptions that glassbox raises at the user's own line.

Offers:
    GlassboxError       base class of everything below
    OutOfOrderError     a module was asked for after the model had passed it
    MissedModuleError   a module was asked for but never ran in this forward (an
                        OutOfOrderError too: nnsight 0.8 raises that one for both)
    TraceStateError     an API was used where it cannot work (outside a trace,
                        from another thread, after tracer.stop(), ...); a
                        ValueError too, as nnsight 0.8 raises ValueError there
    TraceStopped        how ``tracer.stop()`` leaves its block (not an error: the trace catches it)
    WithBlockNotFoundError  a block tracer could not find its ``with`` block's source
                        (``python < script.py``, an ``exec`` of a string, a file edited since)
    SandboxError        remote code tried something the server does not allow
    RemoteError         a remote run failed: no server, a refused request
                        (``status_code``: the HTTP status), a time-out, or a
                        job that failed with an exception type that is not a
                        builtin or one of the above
    at_user_line(exc)   ``exc`` with glassbox's own frames cut from its traceback, so
                        its last frame is the user's line (unless CONFIG.APP.DEBUG)
    filter_traceback(tb, keep)  ``tb`` with only the frames ``keep(frame)`` accepts (None: none)
    user_frames(tb)     ``tb`` without glassbox's own frames (None: all were glassbox's)

Ported nnsight code keeps its ``except``: ``except ValueError`` catches what nnsight raises
as ValueError (``save()`` outside a trace, ``.output`` outside one, a cache declared after a
module access), ``except OutOfOrderError`` (``from glassbox import OutOfOrderError``; nnsight:
``from nnsight.intervention.interleaver import OutOfOrderError``) catches an out-of-order
access and a module that never ran.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from types import FrameType, TracebackType

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


class GlassboxError(Exception):
    """Base class of glassbox's own errors."""


class TraceStateError(GlassboxError, ValueError):
    """An intervention API was used where it cannot work; the message says where it can."""


class OutOfOrderError(GlassboxError):
    """A module boundary was requested after the model had already passed it.

    Within one invoke, modules must be accessed in the order the model runs
    them: read ``layers[3].output`` before ``layers[5].output``.
    """


class MissedModuleError(OutOfOrderError):
    """A module was requested but the forward finished without ever running it."""


class TraceStopped(Exception):
    """``tracer.stop()`` leaving its trace's block: the lines after it do not run (as in nnsight);
    the trace that raised it catches it and ends normally."""


class SandboxError(GlassboxError):
    """Remote code tried something the server's sandbox does not allow; the message says what instead."""


class RemoteError(GlassboxError):
    """A remote run failed; the message says what went wrong and what to do about it.
    ``status_code`` is the HTTP status when the server refused a request (401, 404, 429, ...)."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class WithBlockNotFoundError(GlassboxError):
    """A block tracer (``glassbox.tracing.tracer.Tracer``) found no ``with`` block at its call
    site; the message says why (no source, a stale file, not a ``with``) and what to do."""


def user_frames(tb: TracebackType | None) -> TracebackType | None:
    """``tb`` without glassbox's own frames (None when every frame is glassbox's)."""
    return filter_traceback(tb, lambda frame: not frame.f_code.co_filename.startswith(_PACKAGE))


def filter_traceback(tb: TracebackType | None, keep: Callable[[FrameType], bool]) -> TracebackType | None:
    """A new traceback chain of the entries of ``tb`` whose frame ``keep`` accepts (None if none)."""
    frames = []
    while tb is not None:
        if keep(tb.tb_frame):
            frames.append(tb)
        tb = tb.tb_next
    kept = None
    for entry in reversed(frames):
        kept = TracebackType(kept, entry.tb_frame, entry.tb_lasti, entry.tb_lineno)
    return kept


def at_user_line(exc: BaseException, debug: bool = False) -> BaseException:
    """Drop glassbox's own frames from ``exc``'s traceback (the interleaver's, the envoy's), so it
    ends at the user's line that asked, as nnsight's does; returns ``exc``. With ``debug``
    (``CONFIG.APP.DEBUG``), or when every frame is glassbox's, the traceback is left whole."""
    if debug:
        return exc
    kept = user_frames(exc.__traceback__)
    if kept is not None:
        exc.__traceback__ = kept
    return exc
