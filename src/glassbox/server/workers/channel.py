"""What a feeder talks to: the channel contract, its errors, and the messages both ends share.

Offers:
    Channel              the Protocol every backend's channel implements (local process, Ray replica)
    ChannelClosed        the process (or Ray actor) on the other side of a channel is gone
    WorkerStartError     a worker could not start or load its models
    exit_reason(code)    a process exit status in words ("killed by SIGKILL, often the OOM killer")
    ready_note(message)  the summary of a ``ready`` message for the server's log
    gib(size)            bytes as GiB for messages

Messages on a channel are ``framing`` frames (JSON + bytes), never pickle::

    feeder ──► channel:  {"op": "job", "job": id, "limits": {...}} + request
                         {"op": "batch", "jobs": [ids], "sizes": [n...], "limits": {...}} + requests
                         {"op": "abort"}    (can_abort channels: stop the running job, keep the models)
    channel ──► feeder:  {"op": "log", "job": id, "text": ...}
                         {"op": "result", "job": id, "result": JobResult envelope} + its blob
                         {"op": "crashed", "job": id, "reason": ..., "lineno": n}   its process died
                         {"op": "aborted"}  the running job was stopped
"""

from __future__ import annotations

import threading
from typing import Protocol

__all__ = ["Channel", "ChannelClosed", "WorkerStartError", "exit_reason", "gib", "ready_note"]

_GIB = 1024**3


class ChannelClosed(Exception):
    """The process (or Ray actor) on the other side of a channel is gone."""


class WorkerStartError(RuntimeError):
    """The worker process could not start or could not load its models."""


class Channel(Protocol):
    """One place jobs run (``local.LocalProcess``, ``ray_replicas.RayReplica``); all a feeder uses."""

    serves: list[str]  # the names of the models it holds
    can_abort: bool  # whether an ``abort`` message stops the running job without ending the channel

    @property
    def label(self) -> str: ...  # for logs: "worker 1234", "replica smollm2#0 (pid 99)"

    @property
    def pid(self) -> int | None: ...

    def start(self, stopping: threading.Event) -> dict:
        """Start and wait until the models are loaded; the ``ready`` message with a ``note``.
        Raises WorkerStartError saying why not."""

    def send(self, message: dict, blob: bytes = b"") -> None:
        """Hand over a ``job`` / ``batch`` message; ChannelClosed if the other side is gone."""

    def receive(self, timeout: float) -> tuple[dict, bytes] | None:
        """The next ``log`` / ``result`` message, or None after ``timeout``; ChannelClosed."""

    def alive(self) -> bool: ...

    def kill(self) -> None: ...

    def exit_reason(self) -> str: ...


def gib(size: int) -> str:
    return f"{size / _GIB:.1f}" if size >= _GIB else f"{size / _GIB:.2f}"


def ready_note(message: dict) -> str:
    """"4 torch threads, 1.40 GiB in use of its 8.0 GiB limit; confined: landlock ABI 7 ...": from a
    ``ready`` message."""
    note = f"{message.get('threads')} torch threads"
    used, limit = message.get("memory"), message.get("memory_limit")
    if isinstance(used, int):
        note += f", {gib(used)} GiB in use"
        note += f" of its {gib(limit)} GiB limit" if isinstance(limit, int) and limit else ""
    isolation = message.get("isolation")  # what confine.py applied: the operator's one look at it
    return note + (f"; {isolation}" if isinstance(isolation, str) and isolation else "")


def exit_reason(code: int | None) -> str:
    if code is None:
        return "exit status unknown"
    if code < 0:
        import signal

        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = ", often the out-of-memory killer" if -code == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    return f"exit code {code}"
