"""The client half of ``remote=True``: ship a block, wait, put saved values back.

Offers:
    RemoteRun     one remote trace / generate / session: built from the captured
                  block and the caller's frame; ``.run()`` submits it and, when
                  blocking, writes the saved values into the caller's variables.
                  ``local=True`` (``remote="local"``): the same request, run by the
                  default executor in this process (executor.run_locally).
    JobHandle     what ``blocking=False`` gives: ``.status()``, ``.result()``,
                  ``.cancel()``, ``.forget()``; ``JobHandle(job_id)`` works from a new process too.
    NotSaved      stands in for a variable the block set but did not save.

Call hierarchy::

    Tracer.__enter__(remote=True) ─ capture_body + skip_body ─► RemoteRun(...)
    Tracer.__exit__  ─► RemoteRun.run()
                          ├─ request()    a JobRequest: names the block reads: model ->
                          │               reference, modules -> import, values -> protocol
                          ├─ transport.submit / events (status line, printed output)
                          └─ transport.result ─► JobResult ─► _apply(): write_back(frame, saved)
"""

from __future__ import annotations

import builtins
import itertools
import sys
import time
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..cache import Cache
from ..capture import CapturedBody, write_back
from ..config import CONFIG
from ..envoy import Envoy, path_of, root_of
from ..errors import GlassboxError, TraceStateError
from .executor import run_locally
from .job import FINAL, JobRequest, JobResult, Status
from .protocol import encode_values


class NotSavedError(GlassboxError):
    """A variable set inside a remote block was used without having been saved."""


class NotSaved:
    """Placeholder for a variable the remote block set but did not ``.save()``."""

    def __init__(self, name: str) -> None:
        object.__setattr__(self, "_name", name)

    def _fail(self, *args: Any, **kwargs: Any) -> Any:
        name = object.__getattribute__(self, "_name")
        raise NotSavedError(
            f"`{name}` was not saved by the remote block: call .save() on it inside the block "
            f"(e.g. `{name} = ....save()`) to get its value back"
        )

    def __getattr__(self, attr: str) -> Any:
        return self._fail()

    def __repr__(self) -> str:
        return f"<not saved: {object.__getattribute__(self, '_name')}>"


for _dunder in ("__getitem__", "__setitem__", "__len__", "__iter__", "__float__", "__int__", "__bool__",
                "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__",
                "__matmul__", "__neg__", "__array__", "__call__", "__eq__", "__lt__", "__gt__"):
    setattr(NotSaved, _dunder, NotSaved._fail)
NotSaved.__hash__ = object.__hash__  # type: ignore[method-assign]


class RemoteRun:
    """One block to run on the server."""

    def __init__(
        self,
        model: Any,
        method: str,
        body: CapturedBody,
        frame: types.FrameType,
        inputs: list[Any],
        call: dict[str, Any],
        *,
        timeout: float | None = None,
        blocking: bool = True,
        local: bool = False,
        result_form: Callable[[Any], Any] | None = None,
    ) -> None:
        """``result_form``: turns the ``tracer.result`` that came back into the model's own form
        (glassbox.VLLM: plain dicts back into Completions)."""
        if local and not blocking:
            raise ValueError("remote='local' runs the block in this process: blocking=False is not available")
        if body is None:
            raise TraceStateError(
                "remote=True needs the source of the block (run it from a file or a notebook cell, "
                "not `python -c` or an exec'd string)"
            )
        self.model = model
        self.method = method
        self.body = body
        self.frame: types.FrameType | None = frame
        self.inputs = inputs
        self.call = call
        self.timeout = timeout
        self.blocking = blocking
        self.local = local
        self.result_form = result_form
        self.server_threads: int | None = None  # the torch threads the server ran the block with
        self.sent: dict[str, Any] = {}
        self.result: Any = None
        self.job: JobHandle | None = None
        self._skipper: Any = None

    # ---------------------------------------------------------------- as a with-block

    def enter(self) -> RemoteRun:
        """Called from the context manager's ``__enter__``: skip the block here."""
        from ..capture import skip_body

        self._skipper = None if self.body.trivial else skip_body(self.frame, self.body)
        return self

    def exit(self, exc_type: Any) -> bool:
        """Called from ``__exit__``: run the skipped block remotely; True swallows the skip."""
        from ..capture import SkipBody

        if self._skipper is not None:
            self._skipper.disarm()
        if exc_type is not None and exc_type is not SkipBody:
            return False
        try:
            self.run()
        except BaseException as error:
            error.__suppress_context__ = True  # the skipped block's SkipBody is noise here
            raise
        return True

    # ---------------------------------------------------------------- request

    def request(self) -> JobRequest:
        """The block, the names it reads and the values it needs, as one request."""
        frame = self.frame
        assert frame is not None
        model_refs: dict[str, str] = {}
        modules: dict[str, str] = {}
        values: dict[str, Any] = {}
        for name in sorted(self.body.loads):
            if name == self.body.target:
                continue
            if name in frame.f_locals:
                value = frame.f_locals[name]
            elif name in frame.f_globals:
                value = frame.f_globals[name]
            else:
                continue  # a builtin, or set inside the block first
            if isinstance(value, Envoy):
                if root_of(value) is not self.model:
                    raise TraceStateError(
                        f"`{name}` belongs to a different model than the one traced remotely; "
                        "a remote block can only use the model it traces"
                    )
                model_refs[name] = path_of(value)
            elif isinstance(value, types.ModuleType):
                modules[name] = value.__name__
            elif hasattr(builtins, name) and value is getattr(builtins, name):
                continue  # print, len, ...: the server has its own (a variable that is None is sent)
            elif isinstance(value, NotSaved):
                continue  # an earlier remote block's placeholder: it holds nothing to send
            else:
                values[name] = value
        self.sent = values
        desc, blob = encode_values({"vars": values, "inputs": self.inputs, "call": self.call})
        # containers the block may fill remotely come back
        containers = {n for n, v in values.items() if isinstance(v, (list, dict, set))}
        return JobRequest(
            model=self.model._remote_name(), method=self.method, source=self.body.source,
            filename=self.body.filename, first_line=self.body.first_line,
            tracer_name=self.body.target or "tracer",
            model_refs=model_refs, modules=modules, values=desc, writes=tuple(self.body.writes),
            returns=tuple(sorted(set(self.body.writes) | containers)), timeout=self.timeout,
            threads=torch.get_num_threads(), blob=blob,
        )

    # ---------------------------------------------------------------- running

    def run(self) -> None:
        from . import transport

        request = self.request()
        if self.local:
            self._apply(run_locally(self.model, request, log=_show_log))
            return
        host, key = CONFIG.HOST, CONFIG.API_KEY
        timeout = self.timeout or CONFIG.TIMEOUT
        kept: dict = {}
        if self.blocking:
            # Submitted and followed on one websocket kept open between jobs; a server without it
            # (or a request too large for it) is sent a POST and followed on its own websocket.
            try:
                stream = transport.run(host, key, request, keep_result=kept, timeout=timeout + 30)
                first = next(stream)
            except transport.RunUnavailable:
                stream = None
            if stream is not None:
                self.job = JobHandle(str(first["id"]), host=host, api_key=key)
                _follow(self.job, timeout, kept, events=itertools.chain([first], stream))
                self._apply(kept.get("result") or transport.result(host, key, self.job.id))
                return
        job_id = transport.submit(host, key, request, timeout)
        self.job = JobHandle(job_id, host=host, api_key=key)
        if not self.blocking:
            self.frame = None
            return
        _follow(self.job, timeout, kept)
        self._apply(kept.get("result") or transport.result(host, key, job_id))

    def _apply(self, reply: JobResult) -> None:
        frame = self.frame
        self.frame = None
        self.server_threads = reply.threads
        _say_thread_mismatch(reply.threads)
        for warning in reply.warnings:  # as a local run raises them, before its error if any
            warning.issue(self.body.filename)
        reply.raise_if_failed(self.body.filename)
        decoded = reply.decoded()
        saved = {name: _local_form(value) for name, value in decoded["saved"].items()}
        self.result = decoded["result"] if self.result_form is None else self.result_form(decoded["result"])
        updates: dict[str, Any] = {}
        for name, value in saved.items():
            original = self.sent.get(name)
            if isinstance(original, list) and isinstance(value, list):
                original[:] = value  # keep the caller's object: others may hold it
            elif any(isinstance(original, kind) and isinstance(value, kind) for kind in (dict, set)):
                original.clear()
                original.update(value)
            else:
                updates[name] = value
        for name in reply.unsaved:
            updates.setdefault(name, NotSaved(name))
        if frame is not None:
            write_back(frame, updates)


def _say_thread_mismatch(server_threads: int | None) -> None:
    """CPU kernels split their work by thread count, so results can differ in the last bits when
    the server's torch threads differ from this process's: say so (once per count), and what to do."""
    here = torch.get_num_threads()
    if server_threads is None or server_threads == here or (server_threads, here) in _told:
        return
    _told.add((server_threads, here))
    if CONFIG.STATUS:
        print(f"[glassbox] the server ran this job with {server_threads} torch threads, this process uses "
              f"{here}: values may differ from a local run in the last bits (for equal numbers, serve with "
              f"--torch-threads {here} or call torch.set_num_threads({server_threads}) here)",
              file=sys.stderr, flush=True)


_told: set[tuple[int, int]] = set()


def _local_form(value: Any, depth: int = 0) -> Any:
    """Model outputs index like their logits locally; make the returned ones do too."""
    from ..models.outputs import tensor_like

    if depth > 8 or isinstance(value, Cache):
        return value
    if isinstance(value, dict) and hasattr(value, "to_tuple"):
        return tensor_like(value)
    if isinstance(value, list):
        return [_local_form(v, depth + 1) for v in value]
    if isinstance(value, dict):
        return {k: _local_form(v, depth + 1) for k, v in value.items()}
    return value


def _show_log(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _follow(job: JobHandle, timeout: float, keep_result: dict | None = None,
            events: Iterator[dict] | None = None) -> None:
    """Wait for the job, printing its output and (unless CONFIG.STATUS is off) a
    live status line: one line rewritten in place on a terminal, else one line
    per change of status. ``keep_result``: see ``transport.events`` (the result, when the
    server sends it with the final event); ``events``: the job's events when they come
    another way (``transport.run``)."""
    from . import transport

    deadline = time.monotonic() + timeout + 30
    status_line = _StatusLine(job.id) if CONFIG.STATUS else None
    if events is None:
        events = transport.events(job.host, job.api_key, job.id, keep_result=keep_result)
    try:
        for event in events:
            text = event.get("log")
            if text:
                if status_line is not None:
                    status_line.clear()
                sys.stdout.write(text)
                sys.stdout.flush()
            status = event.get("status")
            if status_line is not None and status:
                status_line.show(status, event.get("position"), event.get("elapsed"), event.get("note"),
                                 event.get("estimated_start_seconds"))
            if status in FINAL:
                return
            if time.monotonic() > deadline:
                job.cancel()
                raise TimeoutError(
                    f"remote job {job.id} did not finish within {timeout:.0f} s; it was cancelled"
                )
    finally:
        if status_line is not None:
            status_line.close()


class _StatusLine:
    """``[glassbox] job 1a2b3c4d: QUEUED (position 2, starts in ~12.0 s) 0.4 s`` on stderr; a
    running job's note: ``RUNNING (loading smollm2 (evicting tiny))``."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id[:8]
        self.live = sys.stderr.isatty()
        self.last: tuple | None = None
        self.width = 0

    def show(self, status: str, position: Any, elapsed: Any, note: Any = None, estimate: Any = None) -> None:
        # position: jobs ahead in the queue; estimate: seconds until it probably starts (the server
        # estimates it from recent run times; None until it can); note: what the server is doing
        # for this job now, e.g. "loading llama70b" (a cold model)
        parts = []
        if status == Status.QUEUED and isinstance(position, int):
            parts.append(f"position {position}" if position else "next")
        if status == Status.QUEUED and isinstance(estimate, (int, float)):
            parts.append(f"starts in ~{float(estimate):.1f} s")
        if note and status != Status.QUEUED:
            parts.append(str(note))
        where = f" ({', '.join(parts)})" if parts else ""
        if self.live:
            seconds = f" {float(elapsed):.1f} s" if elapsed is not None else ""
            line = f"[glassbox] job {self.job_id}: {status}{where}{seconds}"
            sys.stderr.write("\r" + line.ljust(self.width))
            self.width = len(line)
            sys.stderr.flush()
        elif (status, position, note) != self.last:
            # One line per change; a new estimate alone is not a change worth a line.
            print(f"[glassbox] job {self.job_id}: {status}{where}", file=sys.stderr, flush=True)
        self.last = (status, position, note)

    def clear(self) -> None:
        if self.live and self.width:
            sys.stderr.write("\r" + " " * self.width + "\r")
            self.width = 0

    def close(self) -> None:
        if self.live and self.width:
            sys.stderr.write("\n")
            sys.stderr.flush()


class JobHandle:
    """A submitted remote job (``blocking=False``, or ``JobHandle(job_id)`` later)."""

    def __init__(self, job_id: str, host: str | None = None, api_key: str | None = None) -> None:
        self.id = job_id
        self.host = host or CONFIG.HOST
        self.api_key = api_key if api_key is not None else CONFIG.API_KEY

    def status(self) -> dict:
        from . import transport

        return transport.status(self.host, self.api_key, self.id)

    def cancel(self) -> None:
        from . import transport

        transport.cancel(self.host, self.api_key, self.id)

    def forget(self) -> None:
        """Delete the finished job's result from the server (after ``result()``): it then no
        longer counts toward the key's stored-bytes quota."""
        from . import transport

        transport.delete_result(self.host, self.api_key, self.id)

    def result(self, timeout: float | None = None) -> dict[str, Any]:
        """Wait for the job and return its saved values by variable name
        (``"result"`` holds generated ids for a generate job)."""
        from . import transport

        kept: dict = {}
        _follow(self, timeout or CONFIG.TIMEOUT, kept)
        reply = kept.get("result") or transport.result(self.host, self.api_key, self.id)
        reply.raise_if_failed()
        decoded = reply.decoded()
        values = {name: _local_form(v) for name, v in decoded["saved"].items()}
        if decoded["result"] is not None:
            values["result"] = decoded["result"]
        return values

    def __repr__(self) -> str:
        return f"JobHandle({self.id!r}, host={self.host!r})"
