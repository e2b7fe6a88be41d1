"""What running a captured block means (nnsight 0.8's ``nnsight.tracing.backend``).

Offers:
    BlockInfo   ``tracer.info``: the caller's ``frame`` (None once the block has ended) and the
                block's compiled ``code``
    capture_block(frame, marker) / run_backend(tracer, skipper, exc_type)
                a model trace given ``backend=`` (trace.py): capture and skip its block on
                entering, run ``backend(tracer)`` on leaving
    Backend   ``backend(tracer)`` runs ``tracer.info.code`` (the block's compiled body) through
              ``tracer.execute``, in place. Subclass it and override ``__call__`` to log the
              block, run it twice, ship ``tracer.info`` elsewhere, or not run it at all:

                  class Logged(Backend):
                      def __call__(self, tracer):
                          print("running", tracer.info.code.co_filename)
                          super().__call__(tracer)

                  with Tracer(backend=Logged()):
                      total = save(1 + 2)
"""

from __future__ import annotations

from types import CodeType, FrameType
from typing import Any

from ..capture import SkipBody, Skipper, capture_body, skip_body
from ..errors import TraceStateError


class BlockInfo:
    """What a backend gets: the caller's frame (None after the block) and the block's code."""

    __slots__ = ("code", "frame")

    def __init__(self, frame: FrameType | None, code: CodeType | None) -> None:
        self.frame = frame
        self.code = code


def capture_block(frame: FrameType, marker: str) -> tuple[BlockInfo, Skipper | None]:
    """The block entering in ``frame`` for a backend, and the hook that skips it where it stands."""
    body = capture_body(frame, marker)
    if body is None:
        raise TraceStateError(
            "a trace with backend= needs its block's source (it is captured and handed to the "
            "backend), and this one has none (an exec'd string, a one-line `with`): run it from a "
            "file, or drop backend="
        )
    caller = frame.f_code  # named as the caller, so tracebacks show the user's function
    qualname = getattr(caller, "co_qualname", caller.co_name)
    code = body.code.replace(co_name=caller.co_name, co_qualname=qualname)
    return BlockInfo(frame, code), (None if body.trivial else skip_body(frame, body))


def run_backend(tracer: Any, skipper: Skipper | None, exc_type: Any) -> tuple[bool, BaseException | None]:
    """Leaving ``tracer``'s block: give the thread's tracer back, run ``tracer.backend(tracer)``
    and release the frame. Returns whether the backend ran (not when the ``with`` statement
    raised ``exc_type`` itself: that exception stays the caller's) and what it raised."""
    if skipper is not None:
        skipper.disarm()
    info = tracer.info
    if exc_type is not None and not issubclass(exc_type, SkipBody):
        info.frame = None
        return False, None
    try:
        tracer.backend(tracer)
    except BaseException as error:
        error.__context__ = None  # it did not happen "while handling" the skip
        return True, error
    finally:
        info.frame = None  # a tracer kept after the block pins no frame
    return True, None


class Backend:
    """Runs a block tracer's captured block in this process (the default backend)."""

    def __call__(self, tracer: Any) -> None:
        tracer.execute(tracer.info.code)
