"""Per-call iteration in a plain trace: ``tracer.iter[...]`` and ``tracer.all()``.

Offers:
    CallSelector   ``tracer.iter[2]``, ``[0:3]``, ``[:]``, ``[[0, 2]]``: a plain ``for`` loop
                   in which iteration ``i`` addresses each module's call ``i + 1`` (a block
                   shared by several positions, a recurrent loop, a layer applied per step).
    AllCalls       ``with tracer.all():`` runs its block at every iteration (``for _ in
                   tracer.all()`` is ``tracer.iter[:]``); generation's subclass starts it per step
    EveryIteration the captured block of ``tracer.all()``

How a loop knows its iteration exists: the first module the body reads in its first iteration
is the loop's anchor; before each later iteration the trace waits for the anchor's next call.
If the model finishes first, the loop asked for an iteration that never came: as in nnsight 0.8,
a UserWarning says "iteration N ... was never reached" and the block ends there (``TraceStopped``,
which the trace or invoke catches, as for ``tracer.stop()``): the lines after the loop in the same
block do not run, values saved so far are kept. An open-ended loop (``[:]``, ``tracer.all()``)
always ends this way; a bounded one only when its range outruns the model (``[0:5]`` on a module
called 3 times). The warning says how to keep code after the loop: bound it, or move the code.
After a loop, a plain read means the module's first call again, as in nnsight: reading a module
whose first call has passed (the loop's own module, say) raises OutOfOrderError.
Generation traces keep their own step iteration (models/generation.py).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator
from typing import Any

from .capture import SkipBody, capture_body, skip_body, write_back
from .errors import TraceStateError, TraceStopped
from .intercept import Consumer
from .interleave import ENDED

BLOCK_ENDS = (
    "As in nnsight, the block stops here: the lines after the loop in this block do not run "
    "(values saved so far are kept). To run code after a loop, give it a range the model reaches "
    "(tracer.iter[0:3]) or move that code after the `with` block (tracer.result is set there)"
)


class CallSelector:
    """``tracer.iter[...]`` of a plain trace."""

    def __init__(self, tracer: Any) -> None:
        self.tracer = tracer

    def __getitem__(self, selection: int | slice | list[int]) -> Iterator[int]:
        return iterate_calls(self.tracer, *selected(selection))


def selected(selection: int | slice | list[int]) -> tuple[Any, bool]:
    """The iteration numbers a ``tracer.iter[...]`` selection names, and whether it is bounded."""
    if isinstance(selection, int):
        if selection < 0:
            raise ValueError("tracer.iter takes non-negative iteration numbers")
        return [selection], True
    if isinstance(selection, slice):
        if selection.step not in (None, 1) or (selection.start or 0) < 0:
            raise ValueError("tracer.iter takes a contiguous, non-negative range like [2:5] or [:]")
        if selection.stop is None:
            return range(selection.start or 0, sys.maxsize), False
        return range(selection.start or 0, selection.stop), True
    steps = sorted(int(s) for s in selection)
    if steps and steps[0] < 0:
        raise ValueError("tracer.iter takes non-negative iteration numbers")
    return steps, True


def iterate_calls(tracer: Any, indices: Any, bounded: bool) -> Iterator[int]:
    """Yield each iteration number while the body's accesses address that call."""
    interleaver = tracer._active()
    consumer = interleaver.current_consumer()
    previous, previous_first = consumer.iteration, consumer.first
    anchor: tuple[Any, str] | None = None
    done = 0
    try:
        for index in indices:
            if anchor is not None:
                site, kind = anchor
                consumer.iteration = None
                if interleaver.request_call(site.envoy, kind, index + 1, soft=True) is ENDED:
                    warnings.warn(
                        f"iteration {index} of tracer.iter was never reached: {site.describe(kind)} "
                        f"ran only {site.count(kind)} time(s), so the loop ended after {done} "
                        f"iteration(s). {BLOCK_ENDS}",
                        stacklevel=2,
                    )
                    raise TraceStopped()
            consumer.iteration, consumer.first = index, None
            yield index
            done += 1
            if anchor is None:
                anchor = consumer.first
                if anchor is None and not bounded:
                    raise TraceStateError(
                        "an open-ended tracer.iter[:] loop read no module in its first iteration, so "
                        "it cannot tell when the model's calls end: read a module in the loop, or "
                        "give a bounded range like tracer.iter[0:3]"
                    )
    finally:
        consumer.iteration, consumer.first = previous, previous_first
        if previous is None and done:
            consumer.after_iter, consumer.at = True, None  # nnsight: back to each module's first call


class AllCalls:
    """``tracer.all()``: as a ``with`` block its body runs at every iteration."""

    def __init__(self, tracer: Any) -> None:
        self.tracer = tracer

    def __iter__(self) -> Iterator[int]:
        return self.tracer.iter[:]

    def __enter__(self) -> AllCalls:
        frame = sys._getframe(1)
        body = capture_body(frame, "all")
        if body is None:
            raise TraceStateError(
                "`with tracer.all():` needs the source of its block (not available in python -c or "
                "exec'd strings); write `for _ in tracer.iter[:]:` instead"
            )
        every = EveryIteration(body, frame)
        self._start(self.tracer._active(), every)
        self.tracer._publish_later(every.publish)
        self._skipper = skip_body(frame, body)
        return self

    def _start(self, interleaver: Any, every: EveryIteration) -> None:
        """Arrange for ``every`` to run at each iteration (a generation trace: at each step)."""
        consumer = interleaver.current_consumer()
        if interleaver.state != "new" or consumer.run is not None:
            raise TraceStateError(
                "`with tracer.all():` must come in the trace body before any module access (inside an "
                "invoke, or later in the body, write `for _ in tracer.iter[:]:`)"
            )
        tracer = self.tracer

        def run(_start: Any = None) -> None:
            try:
                for _ in iterate_calls(tracer, *selected(slice(None))):
                    every.run()
            except TraceStopped:  # the model made no further call: every iteration has run
                pass

        interleaver.add_consumer(Consumer("tracer.all()", consumer.rows, run))

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        self._skipper.disarm()
        if exc_type is SkipBody:  # as nnsight: an open-ended block ends the trace's block too
            raise TraceStopped()
        return False


class EveryIteration:
    """A captured ``tracer.all()`` block: ``run()`` once per iteration, all in one namespace whose
    names ``publish()`` writes back to the caller's frame after the trace."""

    def __init__(self, body: Any, frame: Any) -> None:
        self.body, self.frame = body, frame
        self.ns = body.namespace(frame)

    def run(self, _start: Any = None) -> None:
        exec(self.body.code, self.ns)

    def publish(self) -> None:
        write_back(self.frame, {n: self.ns[n] for n in self.body.writes if n in self.ns})
        self.frame, self.ns = None, {}
