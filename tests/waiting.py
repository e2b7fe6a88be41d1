"""Waiting in tests: on the condition itself, never for a fixed time; a limit only stops a hang.

Offers:
    PATIENCE                   $GLASSBOX_TEST_PATIENCE (default 1): multiplies every limit below
    patient(seconds) -> float  ``seconds * PATIENCE``
    HANG                       the limit of a wait (15 minutes, times PATIENCE): long enough that
                               only a hang reaches it, however busy the machine is
    REQUEST                    the limit of one HTTP request or websocket read (3 minutes, times PATIENCE)
    wait_until(condition, what, *, limit=HANG, retry=(), process=None, output=None) -> its value
    ProcessDied                raised by wait_until when the ``process`` it watches ended first
    Not(seen)                  a falsy answer for a condition that says what it saw (in the message
                               when the wait gives up): ``return state if ok else Not(state)``
    cpu_hogs(count=2)          a context: ``count`` processes that spin on a core each until it exits
                               (a test of behaviour under load makes its own load)

    server = start_server(...)                       # returns once /v1/health answers
    state = wait_until(lambda: (s := status(job))["status"] == "COMPLETED" and s, f"job {job} to complete")
    wait_until(lambda: ready(url), "the restarted server to answer", retry=(httpx.TransportError,),
               process=server.process, output=server.output)

Why: the suite runs on shared machines (CI, a laptop that builds something else, a 2-core box
at load 10). A test that waits a fixed 30 s for a page or 180 s for a server fails there although
nothing is wrong; a test that waits for the condition passes as soon as it holds, and the limit
(many minutes) only turns a real hang into a failure that says what it waited for, what it saw
last, and, when it watched a process that died, that process's output.

``retry``: exceptions the condition may raise while the thing it looks at is still starting or
restarting (a connection refused or reset): they count as "not yet", and the last one is quoted
if the wait gives up.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

__all__ = ["HANG", "PATIENCE", "REQUEST", "Not", "ProcessDied", "cpu_hogs", "patient", "wait_until"]

T = TypeVar("T")


def _patience() -> float:
    text = os.environ.get("GLASSBOX_TEST_PATIENCE", "").strip()
    try:
        value = float(text) if text else 1.0
    except ValueError:
        raise ValueError(f"GLASSBOX_TEST_PATIENCE must be a number, got {text!r}") from None
    if value <= 0:
        raise ValueError(f"GLASSBOX_TEST_PATIENCE must be above 0, got {text!r}")
    return value


PATIENCE = _patience()


def patient(seconds: float) -> float:
    """``seconds`` scaled by ``GLASSBOX_TEST_PATIENCE``."""
    return seconds * PATIENCE


HANG = patient(15 * 60)
REQUEST = patient(3 * 60)


class ProcessDied(AssertionError):
    """The process a wait watched ended before the condition held."""


class Not:
    """A condition's "not yet" that keeps what it saw, for the message if the wait gives up."""

    def __init__(self, seen: Any) -> None:
        self.seen = seen

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f"not yet: {self.seen!r}"


def wait_until(condition: Callable[[], T], what: str, *, limit: float | None = None,
               interval: float = 0.05, retry: tuple[type[BaseException], ...] = (),
               process: Any = None, output: Callable[[], str] | None = None) -> T:
    """Call ``condition`` until it returns something truthy, and return that.

    ``what`` says what is waited for ("job X to complete"): the message when it gives up after
    ``limit`` seconds (default ``HANG``) says it, with the last value seen (or the last exception of
    ``retry``). ``process`` (a ``subprocess.Popen`` or anything with ``poll()``): stop at once if
    it exits first, with ``output()`` (its log) in the message.
    """
    limit = HANG if limit is None else limit
    started = time.monotonic()
    last: Any = None
    failure: BaseException | None = None
    while True:
        try:
            value = condition()
        except retry as err:
            failure, value = err, None
        else:
            failure, last = None, value
        if value:
            return value
        if process is not None and process.poll() is not None:
            # One more look: it may have finished its work and exited (a job, a one-shot command).
            try:
                value = condition()
            except retry:
                value = None
            if value:
                return value
            log = f":\n{_tail(output())}" if output is not None else ""
            raise ProcessDied(f"gave up waiting for {what}: the process (pid {process.pid}) exited with "
                              f"{process.poll()} first{log}")
        waited = time.monotonic() - started
        if waited > limit:
            seen = (f"the last attempt raised {type(failure).__name__}: {failure}" if failure is not None
                    else f"the last value was {last!r}")
            log = f"\n{_tail(output())}" if output is not None else ""
            raise AssertionError(f"gave up waiting for {what} after {waited:.0f} s (a limit that only "
                                 f"stops hangs; GLASSBOX_TEST_PATIENCE multiplies it): {seen}{log}")
        time.sleep(interval)


def _tail(text: str, keep: int = 20_000) -> str:
    return text if len(text) <= keep else f"[... {len(text) - keep} characters before]\n{text[-keep:]}"


@contextlib.contextmanager
def cpu_hogs(count: int = 2) -> Iterator[list[subprocess.Popen]]:
    """``count`` busy loops (``python -c "while True: pass"``), each keeping a core busy, killed
    (and reaped) when the block ends, whatever happened in it."""
    hogs: list[subprocess.Popen] = []
    try:
        for _ in range(count):
            hogs.append(subprocess.Popen([sys.executable, "-c", "while True: pass"],
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL))
        yield hogs
    finally:
        for hog in hogs:
            hog.kill()
        for hog in hogs:
            hog.wait()
