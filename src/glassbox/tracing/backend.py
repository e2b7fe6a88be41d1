"""What running a captured block means (nnsight 0.8's ``nnsight.tracing.backend``).

Offers:
    BlockInfo   ``tracer.info``: the caller's ``frame`` (None once the block has ended) and the
                block's compiled ``code``
    capture_block(frame, marker) / run_backend(tracer, skipper, exc_type) / raise_clean(error)
                a tracer with a backend (trace.py's given ``backend=``, tracer.py's always):
                capture and skip its block on entering, run ``backend(tracer)`` on leaving, and
                raise what the block raised as it raised it
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
from typing import Any, NoReturn

from ..capture import SkipBody, Skipper, capture_body, named_as_caller, skip_body
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
    code = named_as_caller(body.code, frame)  # tracebacks show the user's function
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
    except BaseException as error:  # the tracer re-raises it (raise_clean)
        return True, error
    finally:
        info.frame = None  # a tracer kept after the block pins no frame
    return True, None


def raise_clean(error: BaseException) -> NoReturn:
    """Raise what a backend's block raised from the tracer's ``__exit__``, where the skip is being
    handled: a bare re-raise keeps ``__context__`` cleared (the error did not happen "during
    handling" of the skip; a plain ``raise error`` there would chain it)."""
    try:
        raise error
    except BaseException as raised:
        raised.__context__ = None
        raise


class Backend:
    """Runs a block tracer's captured block in this process (the default backend)."""

    def __call__(self, tracer: Any) -> None:
        tracer.execute(tracer.info.code)
