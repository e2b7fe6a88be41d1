"""Deferred invoke bodies: run a captured block as a consumer greenlet.

Offers:
    Deferred   one body run during the forward by a Consumer greenlet: a
               ``tracer.invoke`` block (``Deferred.invoke``: its input, its
               namespace shared in order with the other invokes), or an
               independent body of ``tracing.run_together``.

Several invokes run interleaved in one forward pass, yet must behave as if
they had run one after another: a later invoke may read a variable that an
earlier one sets (``cat = ...save()`` in invoke 0, ``... = cat`` in invoke 1).
Each body therefore gets its own namespace (loop variables keep the value of
their iteration), values an invoke sets are copied to later invokes whenever
it hands control back, and a later invoke that reads a name an earlier one
will set waits for it instead of failing (or seeing a stale value).
"""

from __future__ import annotations

from types import CodeType, FrameType
from typing import Any

from .capture import CapturedBody, write_back
from .errors import TraceStopped
from .intercept import Consumer
from .interleave import Interleaver

_UNSET = object()


def _frame_value(frame: FrameType, name: str) -> Any:
    if name in frame.f_locals:
        return frame.f_locals[name]
    return frame.f_globals.get(name, _UNSET)


class _InvokeLocals(dict):
    """Locals of a deferred body: stores also reach its globals (so nested
    functions and comprehensions see them); a missing name that an earlier
    invoke will set makes the body wait for it."""

    def __init__(self, owner: Deferred) -> None:
        super().__init__()
        self.owner = owner

    def __setitem__(self, name: str, value: Any) -> None:
        dict.__setitem__(self, name, value)
        self.owner.ns[name] = value

    def __delitem__(self, name: str) -> None:
        dict.__delitem__(self, name)
        self.owner.ns.pop(name, None)

    def __missing__(self, name: str) -> Any:
        return self.owner.wait_for(name)


class Deferred:
    """A body run as a consumer of the forward: a ``tracer.invoke`` block (``Deferred.invoke``),
    or one independent body of ``tracing.run_together`` (the plain constructor), which shares
    no names with the others and leaves every name it set in ``namespace``."""

    def __init__(self, code: CodeType, namespace: dict[str, Any], inputs: Any, label: str,
                 writes: tuple[str, ...] = ()) -> None:
        self.code = code
        self.writes = writes  # the names shared with later invokes and written back to the caller
        self.frame: FrameType | None = None
        self.inputs = inputs
        self.earlier: list[Deferred] = []
        self.later: list[Deferred] = []
        self.entered: dict[str, Any] = {}
        self.own: set[str] = set()
        self.fallback: dict[str, Any] = {}
        self.ns = namespace
        self.locals = _InvokeLocals(self)
        self.published: dict[str, Any] = {}
        self.waiting_name: str | None = None
        self.interleaver: Interleaver | None = None
        self.consumer = Consumer(label, None, self._run)
        self.consumer.on_yield = self._share
        self.consumer.wake = self.wake_all

    @classmethod
    def invoke(cls, body: CapturedBody, frame: FrameType, inputs: Any, earlier: list[Deferred]) -> Deferred:
        """One ``tracer.invoke`` block entered in ``frame``, after the ``earlier`` ones."""
        ns = body.namespace(frame)
        self = cls(body.code, ns, inputs, f"invoke {len(earlier)}", tuple(body.writes))
        self.frame = frame
        self.earlier = list(earlier)
        for other in earlier:
            other.later.append(self)
        # What the caller's variables held as this block was entered, for the names
        # it sets (a later invoke compares against these; see below).
        self.entered = {n: _frame_value(frame, n) for n in body.writes}
        # A name an earlier invoke sets comes from that invoke (as if the blocks had run
        # one after another), unless the caller rebound it after that invoke was entered:
        # then, run in order, the caller's assignment came last (`for j, layer in ...`).
        for name in list(ns):
            producer = next((o for o in reversed(earlier) if name in o.writes), None)
            if producer is None:
                continue
            if ns[name] is not producer.entered.get(name, _UNSET):
                self.own.add(name)
            else:
                self.fallback[name] = ns.pop(name)
        return self

    def _run(self, _start: Any = None) -> None:
        try:
            exec(self.code, self.ns, self.locals)
        except TraceStopped:  # tracer.stop() in this body: its lines after do not run, the trace ends
            pass

    # ---------------------------------------------------------------- sharing

    def wait_for(self, name: str) -> Any:
        """Called in this body's greenlet when it reads a name it lacks."""
        ns = self.ns
        while name not in ns:
            if not any(o.may_set(name) for o in self.earlier):
                if name in self.fallback:
                    return self.fallback[name]
                raise KeyError(name)
            self.waiting_name = name
            self.interleaver.runner_glet.switch()  # type: ignore[union-attr]
            self.waiting_name = None
        return ns[name]

    def may_set(self, name: str) -> bool:
        return name in self.writes and not self.consumer.done

    def _share(self) -> None:
        """Runs in the runner each time this body hands back control."""
        ns = self.ns
        for name in self.writes:
            value = ns.get(name, _UNSET)
            if value is not _UNSET and self.published.get(name, _UNSET) is not value:
                self.published[name] = value
                for other in self.later:
                    if name not in other.own:
                        other.ns[name] = value
        for other in self.later:
            name = other.waiting_name
            if name is not None and (name in other.ns or not any(o.may_set(name) for o in other.earlier)):
                self.interleaver.resume(other.consumer, None)  # type: ignore[union-attr]

    def wake_all(self) -> None:
        """After the forward: let a body still waiting for a name fail or fall back."""
        if self.waiting_name is not None and not self.consumer.done:
            self.interleaver.resume(self.consumer, None)  # type: ignore[union-attr]

    def publish(self) -> None:
        """After the trace: the names this body set become the caller's variables."""
        values = {n: self.ns[n] for n in self.writes if n in self.ns}
        if self.frame is not None:
            write_back(self.frame, values)
        self.frame = None
        self.ns = {}
        self.locals = None  # type: ignore[assignment]
