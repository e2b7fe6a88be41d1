"""A remote job as typed values: the request a client sends, the result it gets back, the status.

Offers:
    Status          RECEIVED, QUEUED, RUNNING, COMPLETED, ERROR, CANCELLED (a ``str`` enum: the
                    wire, the database and the dashboard carry the plain names)
    FINAL           the statuses a job ends in (the one definition; everything else imports it)
    JOB_KIND, RESULT_KIND, METHODS
    JobRequest      frozen: one block to run (model, method, source, names, values + blob)
      .read(data) / .from_envelope(envelope, blob)   the ONE way in: unframe + header + field checks
      .envelope() / .frame()                          the wire form (unchanged since protocol 1)
      .decoded(numpy_as_tensor=False) -> JobValues    the values it carries (vars, inputs, call)
      .input_count / .call_is_empty / .call_is_dict   what batching asks, read off the description
    JobValues       vars / inputs / call, decoded
    JobError        type, message, lineno, line (what a user's traceback shows)
    JobWarning      category, message, lineno: a warning raised at a line of the user's block
      .issue(filename)                              raised again in the client, at that line
    JobResult       frozen: what a job gave back (status, saved-values description + blob, error)
      .completed(values, unsaved, blob) / .failed(kind, message, ...) / .from_exception(...)
      .read(data) / .from_envelope(envelope, blob) / .envelope() / .frame()
      .decoded() -> {"saved": {...}, "result": ...}   the ONE place a reply's values are decoded
      .raise_if_failed(filename)                     the job's error as the exception it was
      .warnings                                      the JobWarnings its block raised

    request = JobRequest(model="gpt2", method="trace", source="out = m.output.save()\\n")
    assert JobRequest.read(request.frame()) == request
    result = JobResult.failed("ValueError", "bad")
    assert JobResult.read(result.frame()).error.message == "bad"

Why a module of its own: the request used to be a dict built in the client and read by string key
in the API, the feeder, the worker, the executor and the co-tenant runner, each checking (or not)
what it read. Here it is read once, checked once, and then passed as a value. The JSON on the wire
is exactly what protocol 1 sent (a frozen copy of a request is tested), so old clients keep working.
"""

from __future__ import annotations

import builtins
import dataclasses
import enum
import math
import warnings
from typing import Any

from ..errors import GlassboxError, RemoteError
from .framing import frame, unframe
from .protocol import ProtocolError, check_envelope, decode_values, make_envelope

__all__ = [
    "FINAL",
    "JOB_KIND",
    "MAX_WARNINGS",
    "MAX_WARNING_CHARS",
    "METHODS",
    "RESULT_KIND",
    "JobError",
    "JobRequest",
    "JobResult",
    "JobValues",
    "JobWarning",
    "Status",
]

JOB_KIND = "job"
RESULT_KIND = "result"
METHODS = ("trace", "generate", "session")


class Status(str, enum.Enum):
    """A job's life on a server; a ``str``, so ``Status.QUEUED == "QUEUED"`` and JSON carries the name."""

    RECEIVED = "RECEIVED"
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    ERROR = "ERROR"
    CANCELLED = "CANCELLED"

    def __str__(self) -> str:  # "QUEUED", not "Status.QUEUED", in f-strings and messages
        return self.value

    __format__ = str.__format__


FINAL = frozenset({Status.COMPLETED, Status.ERROR, Status.CANCELLED})


def _malformed(what: str) -> ProtocolError:
    return ProtocolError(f"malformed job request: {what}; send it with a glassbox client "
                         "(`with model.trace(..., remote=True):`)")


def _names(value: Any, field: str, kind: type) -> Any:
    """``value`` checked to be a list of str (kind=tuple) or a dict of str -> str (kind=dict)."""
    if kind is tuple:
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise _malformed(f"{field!r} must be a list of names")
        return tuple(value)
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                              for k, v in value.items()):
        raise _malformed(f"{field!r} must map names to names")
    return dict(value)


@dataclasses.dataclass(frozen=True)
class JobValues:
    """What a request's values decode to: the block's free variables, the trace's inputs and
    keyword arguments."""

    vars: dict[str, Any]
    inputs: list[Any]
    call: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class JobRequest:
    """One block to run on a server.

        request = JobRequest(model="gpt2", method="trace", source="h = m.output.save()\\n")
        data = request.frame()                      # the bytes POST /v1/jobs takes
        assert JobRequest.read(data).source == request.source
    """

    model: str
    method: str
    source: str
    filename: str = "<remote block>"
    first_line: int = 2
    tracer_name: str = "tracer"
    model_refs: dict[str, str] = dataclasses.field(default_factory=dict)  # name -> module path
    modules: dict[str, str] = dataclasses.field(default_factory=dict)  # name -> module to import
    values: dict = dataclasses.field(default_factory=lambda: {"values": {}})  # encode_values' description
    writes: tuple[str, ...] = ()  # names the block assigns
    returns: tuple[str, ...] = ()  # names whose values come back when they hold saved values
    timeout: float | None = None
    threads: int | None = None  # the client's torch threads (its results depend on them); older clients: None
    blob: bytes = dataclasses.field(default=b"", repr=False)  # the values' tensors (safetensors)

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise _malformed("'model' must name a served model")
        if self.method not in METHODS:
            raise _malformed(f"unknown method {self.method!r}; expected one of {METHODS}")
        if not isinstance(self.source, str):
            raise _malformed("'source' must be the block's text")
        if not isinstance(self.filename, str):
            raise _malformed("'filename' must be a str")
        if type(self.first_line) is not int or self.first_line < 1:
            raise _malformed(f"'first_line' must be a positive int, got {self.first_line!r}")
        if (not isinstance(self.tracer_name, str) or not self.tracer_name.isidentifier()
                or self.tracer_name.startswith("_")):
            raise _malformed(f"bad tracer name {self.tracer_name!r}")
        for field in ("model_refs", "modules"):
            object.__setattr__(self, field, _names(getattr(self, field), field, dict))
        for field in ("writes", "returns"):
            object.__setattr__(self, field, _names(getattr(self, field), field, tuple))
        if not isinstance(self.values, dict) or not isinstance(self.values.get("values"), dict):
            raise _malformed("'values' must be the description encode_values makes")
        timeout = self.timeout
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or not math.isfinite(timeout)):
            raise _malformed(f"'timeout' must be a number of seconds or null, got {timeout!r}")
        if self.threads is not None and (type(self.threads) is not int or self.threads < 1):
            raise _malformed(f"'threads' must be a positive int or null, got {self.threads!r}")
        if not isinstance(self.blob, (bytes, bytearray, memoryview)):
            raise _malformed("the blob must be bytes")
        object.__setattr__(self, "blob", bytes(self.blob))

    # ---------------------------------------------------------------- the wire

    @classmethod
    def read(cls, data: bytes) -> JobRequest:
        """A framed request (what ``POST /v1/jobs`` receives) -> a checked request."""
        envelope, blob = unframe(data)
        return cls.from_envelope(envelope, blob)

    @classmethod
    def from_envelope(cls, envelope: dict, blob: bytes = b"") -> JobRequest:
        payload = check_envelope(envelope, JOB_KIND, receiver="server")
        known = {f.name for f in dataclasses.fields(cls)} - {"blob"}
        fields = {name: value for name, value in payload.items() if name in known}
        # Old clients send JSON null for fields they had nothing for: the default then.
        fields = {name: value for name, value in fields.items() if value is not None}
        missing = [name for name in ("model", "method", "source") if name not in fields]
        if missing:
            raise _malformed(f"missing {', '.join(map(repr, missing))}")
        try:
            return cls(**fields, blob=blob)
        except TypeError as err:
            raise _malformed(str(err)) from None

    def envelope(self) -> dict:
        """The JSON part, with the protocol header, exactly as protocol 1 lays it out (``threads``,
        added later, only when known: an older server ignores it)."""
        payload = {
            "model": self.model, "method": self.method, "source": self.source, "filename": self.filename,
            "first_line": self.first_line, "tracer_name": self.tracer_name,
            "model_refs": dict(self.model_refs), "modules": dict(self.modules), "values": self.values,
            "writes": list(self.writes), "returns": list(self.returns), "timeout": self.timeout,
        }
        if self.threads is not None:
            payload["threads"] = self.threads
        return make_envelope(JOB_KIND, payload)

    def frame(self) -> bytes:
        return frame(self.envelope(), self.blob)

    # ---------------------------------------------------------------- what it carries

    def decoded(self, *, numpy_as_tensor: bool = False) -> JobValues:
        """Decode the values (data only: no pickle; functions come as ``RemoteFunction`` source)."""
        values = decode_values(self.values, self.blob, numpy_as_tensor=numpy_as_tensor)
        return JobValues(vars=dict(values.get("vars") or {}), inputs=list(values.get("inputs") or ()),
                         call=dict(values.get("call") or {}))

    def _described(self, name: str) -> Any:
        return self.values["values"].get(name)

    @property
    def input_count(self) -> int | None:
        """How many positional inputs the trace call has (None: not a list)."""
        node = self._described("inputs")
        if not isinstance(node, dict) or node.get("t") != "list" or not isinstance(node.get("v"), list):
            return None
        return len(node["v"])

    @property
    def call_is_dict(self) -> bool:
        """The trace call's keyword arguments are a plain dict (any keys)."""
        node = self._described("call")
        return isinstance(node, dict) and node.get("t") == "dict"

    @property
    def call_is_empty(self) -> bool:
        """The trace call has no keyword arguments beyond the input."""
        return self._described("call") == {"t": "dict", "v": {}}

    def line(self, lineno: int | None) -> str | None:
        """The text of the block's line ``lineno`` (numbered as in the user's file), if it has one."""
        if lineno is None:
            return None
        lines = self.source.splitlines()
        index = lineno - self.first_line
        return lines[index].strip() if 0 <= index < len(lines) else None


@dataclasses.dataclass(frozen=True)
class JobError:
    """Why a job failed, as the user sees it: the exception's type and message, and their line."""

    type: str
    message: str
    lineno: int | None = None
    line: str | None = None

    @classmethod
    def from_wire(cls, node: Any) -> JobError:
        node = node if isinstance(node, dict) else {}
        lineno = node.get("lineno")
        line = node.get("line")
        return cls(type=str(node.get("type") or "RemoteError"), message=str(node.get("message") or ""),
                   lineno=lineno if type(lineno) is int else None,
                   line=line if isinstance(line, str) else None)

    def wire(self) -> dict:
        return {"type": self.type, "message": self.message, "lineno": self.lineno, "line": self.line}

    def exception(self, filename: str = "<remote block>") -> BaseException:
        """The error as an exception of its own class where glassbox or Python has one."""
        where = ""
        if self.lineno:
            where = f'\n  on the server, at File "{filename}", line {self.lineno}'
            if self.line:
                where += f": {self.line}"
        message = f"{self.message or 'remote job failed'}{where}"
        cls = _glassbox_error(self.type) or getattr(builtins, self.type, None)
        if isinstance(cls, type) and issubclass(cls, Exception):
            try:
                return cls(message)
            except TypeError:
                pass
        return RemoteError(f"{self.type}: {message}")


def _glassbox_error(name: str) -> type | None:
    """glassbox's own exception class of that name (OutOfOrderError, SandboxError, ...), if any."""
    todo = [GlassboxError]
    while todo:
        cls = todo.pop()
        if cls.__name__ == name:
            return cls
        todo.extend(cls.__subclasses__())
    return None


MAX_WARNINGS = 32  # a job's warnings that travel (as Python shows each location once, so do we)
MAX_WARNING_CHARS = 2000


@dataclasses.dataclass(frozen=True)
class JobWarning:
    """A warning the job's block raised (or that glassbox raised about one of its lines), as the
    client raises it again: its category's name, its message, the block's line it points at."""

    category: str
    message: str
    lineno: int

    @classmethod
    def from_wire(cls, node: Any) -> JobWarning | None:
        if not isinstance(node, dict) or type(node.get("lineno")) is not int:
            return None
        return cls(category=str(node.get("category") or "UserWarning")[:100],
                   message=str(node.get("message") or "")[:MAX_WARNING_CHARS], lineno=node["lineno"])

    def wire(self) -> dict:
        return {"category": self.category, "message": self.message, "lineno": self.lineno}

    def issue(self, filename: str) -> None:
        """Raise it again here, at the user's line in ``filename``: filters, ``pytest.warns`` and
        ``-W error`` see it as a local run's. Only Python's own categories are rebuilt by name
        (nothing the server says picks a class to import); another arrives as a UserWarning
        that names it."""
        cls = getattr(builtins, self.category, None)
        message = self.message
        if not (isinstance(cls, type) and issubclass(cls, Warning)):
            cls, message = UserWarning, f"{self.category}: {message}"
        warnings.warn_explicit(message, cls, filename, self.lineno)


@dataclasses.dataclass(frozen=True)
class JobResult:
    """What one job gave back.

        result = JobResult.failed("TimeoutError", "the job exceeded the time limit")
        assert JobResult.read(result.frame()).status is Status.ERROR
    """

    status: Status
    values: dict | None = None  # encode_values' description of {"saved": ..., "result": ...}
    unsaved: tuple[str, ...] = ()  # names the block set but did not save
    error: JobError | None = None
    seconds: float | None = None
    threads: int | None = None  # the torch threads the job ran with (None: not said)
    blob: bytes = dataclasses.field(default=b"", repr=False)
    warnings: tuple[JobWarning, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", Status(self.status))
        object.__setattr__(self, "warnings", tuple(self.warnings)[:MAX_WARNINGS])
        object.__setattr__(self, "unsaved", tuple(self.unsaved))
        object.__setattr__(self, "blob", bytes(self.blob))

    @classmethod
    def completed(cls, values: dict, unsaved: list[str] | tuple[str, ...], blob: bytes = b"",
                  seconds: float | None = None) -> JobResult:
        return cls(Status.COMPLETED, values=values, unsaved=tuple(unsaved), blob=blob, seconds=seconds)

    @classmethod
    def failed(cls, kind: str, message: str, *, lineno: int | None = None, line: str | None = None,
               status: Status = Status.ERROR, seconds: float | None = None) -> JobResult:
        return cls(status, error=JobError(kind, message, lineno, line), seconds=seconds)

    @property
    def ok(self) -> bool:
        return self.status is Status.COMPLETED

    def replace(self, **changes: Any) -> JobResult:
        return dataclasses.replace(self, **changes)

    # ---------------------------------------------------------------- the wire

    @classmethod
    def read(cls, data: bytes) -> JobResult:
        envelope, blob = unframe(data)
        return cls.from_envelope(envelope, blob)

    @classmethod
    def from_envelope(cls, envelope: dict, blob: bytes = b"") -> JobResult:
        reply = check_envelope(envelope, RESULT_KIND, receiver="client")
        status = reply.get("status")
        if status not in (Status.COMPLETED, Status.ERROR, Status.CANCELLED):
            raise ProtocolError(f"malformed job result: status {status!r}")
        values = reply.get("values")
        if status == Status.COMPLETED and not isinstance(values, dict):
            raise ProtocolError("malformed job result: a completed job's result has no values")
        seconds = reply.get("seconds")
        threads = reply.get("threads")
        unsaved = reply.get("unsaved") or ()
        said = reply.get("warnings")
        said = said[:MAX_WARNINGS] if isinstance(said, list) else []
        found = [JobWarning.from_wire(node) for node in said]
        return cls(Status(status), values=values if isinstance(values, dict) else None,
                   warnings=tuple(w for w in found if w is not None),
                   unsaved=tuple(str(name) for name in unsaved if isinstance(name, str)),
                   error=None if status == Status.COMPLETED else JobError.from_wire(reply.get("error")),
                   seconds=float(seconds) if isinstance(seconds, (int, float)) else None,
                   threads=threads if type(threads) is int else None, blob=blob)

    def envelope(self) -> dict:
        reply: dict[str, Any] = {"status": self.status.value}
        if self.values is not None:
            reply["values"] = self.values
            reply["unsaved"] = list(self.unsaved)
        if self.error is not None:
            reply["error"] = self.error.wire()
        if self.seconds is not None:
            reply["seconds"] = self.seconds
        if self.threads is not None:
            reply["threads"] = self.threads
        if self.warnings:  # absent when there are none: the wire of protocol 1 is unchanged
            reply["warnings"] = [w.wire() for w in self.warnings]
        return make_envelope(RESULT_KIND, reply)

    def frame(self) -> bytes:
        return frame(self.envelope(), self.blob)

    # ---------------------------------------------------------------- what it carries

    def decoded(self) -> dict[str, Any]:
        """``{"saved": {name: value}, "result": ...}`` of a completed job."""
        if self.values is None:
            return {"saved": {}, "result": None}
        decoded = decode_values(self.values, self.blob)
        return {"saved": dict(decoded.get("saved") or {}), "result": decoded.get("result")}

    def raise_if_failed(self, filename: str = "<remote block>") -> None:
        if not self.ok:
            error = self.error or JobError("RemoteError", f"the job ended {self.status}")
            raise error.exception(filename)
