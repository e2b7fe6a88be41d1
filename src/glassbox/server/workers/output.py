"""What one job's output may make the server keep: cut to the server's limits before it is stored.

Offers:
    Output                              a job's output as it is stored: status, framed result, error, logs
    bounded(result, logs, config, status=None) -> Output
    cut(text, max_bytes, note) -> text  at most ``max_bytes`` of UTF-8 (when the note fits), ending
                                        with ``note`` (``{cut}``: how many bytes were cut) if cut

Every byte a job makes the server keep or send counts, whatever its kind (README: Limits):

* its error (type, message, the line it points at): the message is cut to ``max_error_bytes``,
  the type and the line to a few hundred bytes;
* its printed output: to ``max_log_bytes`` (the worker cuts it first, with its own note; this is
  the guarantee, whatever a worker sent);
* all of it together -- the result as framed (which carries the error too), the error as stored,
  the printed output in UTF-8 -- to ``max_result_bytes``: a result over it alone fails the job
  (MemoryError, with the numbers), otherwise the printed output is cut to what is left.

What is cut ends with a note that says how many bytes were cut and which setting to raise; the
job keeps its status (a completed job stays COMPLETED). The per-key quota is checked when the
output is stored (``JobStore.finish``), on what this returns.
"""

from __future__ import annotations

import dataclasses

from ...remote.job import JobError, JobResult, Status
from ...remote.protocol import ProtocolError
from ..config import ServerConfig
from ..job_rows import error_text, output_bytes

__all__ = ["Output", "bounded", "cut"]

_MAX_TYPE_BYTES = 200
_MAX_LINE_BYTES = 500
# The worker's own note on output it cut (child.py) is kept on top of max_log_bytes.
_NOTE_ROOM = 1024


@dataclasses.dataclass(frozen=True)
class Output:
    status: Status
    result: bytes  # the framed JobResult its owner fetches
    error: dict | None  # what the job's status shows (None when it completed)
    logs: str


def cut(text: str, max_bytes: int, note: str) -> str:
    """``text`` if it is at most ``max_bytes`` of UTF-8, else its start and ``note`` (in which
    ``{cut}`` becomes the number of bytes left out), within ``max_bytes`` when the note fits."""
    data = text.encode("utf-8", "replace")
    if len(data) <= max_bytes:
        return text
    room = max(0, max_bytes - len(note.format(cut=f"{len(data):,}").encode()))
    return data[:room].decode("utf-8", "ignore") + note.format(cut=f"{len(data) - room:,}")


def bounded(result: JobResult, logs: list[str] | str, config: ServerConfig,
            status: Status | None = None) -> Output:
    """``result`` and ``logs`` as the store may keep them under ``config``'s limits (see above)."""
    if result.error is not None:
        result = result.replace(error=_short_error(result.error, config.max_error_bytes))
    text = cut("".join(logs), config.max_log_bytes + _NOTE_ROOM, (
        "\n[glassbox] {cut} more bytes of printed output were cut: the server keeps at most "
        f"{config.max_log_bytes:,} bytes of a job's printed output (max_log_bytes)\n"))
    limit = config.max_result_bytes
    result, data = _framed(result)
    if result.status == Status.COMPLETED and len(data) > limit:
        result, data = _framed(JobResult.failed("MemoryError", (
            f"the result is {len(data):,} bytes as sent back, over this server's result limit of "
            f"{limit:,} bytes (max_result_bytes); save fewer or smaller values (e.g. one position: "
            "h[:, -1])"), seconds=result.seconds))
    status = status or result.status
    error = result.error.wire() if status != Status.COMPLETED and result.error else None
    kept = output_bytes(data, error, text)
    if kept > limit:
        room = max(0, limit - len(data) - (len(error_text(error)) if error else 0))
        text = cut(text, room, (
            "\n[glassbox] {cut} more bytes of printed output were cut: the server keeps at most "
            f"{limit:,} bytes of a job's result, error and printed output together (max_result_bytes)\n"))
    return Output(status, data, error, text)


def _framed(result: JobResult) -> tuple[JobResult, bytes]:
    try:
        return result, result.frame()
    except (ProtocolError, MemoryError) as err:
        failed = JobResult.failed("InternalError", f"the result could not be stored: {err}")
        return failed, failed.frame()


def _short_error(error: JobError, max_bytes: int) -> JobError:
    message = cut(error.message, max_bytes, (
        "\n[glassbox] {cut} more bytes of this error message were cut: the server keeps at most "
        f"{max_bytes:,} bytes of a job's error message (max_error_bytes)"))
    line = None if error.line is None else cut(error.line, _MAX_LINE_BYTES, " [... {cut} bytes cut]")
    kind = cut(error.type, _MAX_TYPE_BYTES, "...")
    return dataclasses.replace(error, type=kind, message=message, line=line)
