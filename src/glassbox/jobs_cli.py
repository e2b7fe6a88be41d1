"""``glassbox jobs``: a server's jobs from the command line (the caller's own jobs, by its API key).

Offers:
    add_jobs_parser(commands)     add the ``jobs`` subcommand to ``glassbox``'s subparsers
    run_jobs(args) -> exit code   what ``glassbox jobs ...`` runs
    OK, JOB_FAILED, USAGE, UNREACHABLE, NOT_FINISHED    the exit codes

Commands::

    glassbox jobs list                       id, model, status, submitted, run time (--json: raw)
    glassbox jobs status ID                  one job's state: queued, its position and estimated
                                             start; running, what the server does for it now
                                             ("loading smollm2"); --json: raw
    glassbox jobs logs ID [--follow]         what it printed; --follow streams until the job ends
    glassbox jobs result ID [--out F.safetensors]    its saved values: listed, or written to a file
    glassbox jobs cancel ID

Each talks HTTP to the server at ``--url``, else ``GLASSBOX_HOST``, else ``host =`` in the
config file (``GLASSBOX_CONFIG`` or ``~/.config/glassbox/config``), else http://127.0.0.1:8765,
with the key from ``--key`` / ``GLASSBOX_API_KEY`` / ``api_key =``: the places a remote trace
reads (``glassbox.config.Config``), read when the command runs.

Exit codes, for scripts: 0 OK (for status / logs / result: the job completed, or is still queued
or running); 1 the job ended in ERROR or CANCELLED (cancel: it had already finished); 2 usage,
no key, key rejected, or no such job; 3 the server cannot be reached (or failed: HTTP 5xx);
4 the job has not finished yet (result).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from .errors import RemoteError
from .remote.job import FINAL, JobError, Status

__all__ = ["JOB_FAILED", "NOT_FINISHED", "OK", "UNREACHABLE", "USAGE", "add_jobs_parser", "run_jobs"]

OK, JOB_FAILED, USAGE, UNREACHABLE, NOT_FINISHED = 0, 1, 2, 3, 4


def add_jobs_parser(commands: Any) -> None:
    """Add ``jobs`` (list / status / logs / result / cancel) to ``glassbox``'s subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", help="server URL (default: $GLASSBOX_HOST, the config file's host, "
                                      "else http://127.0.0.1:8765)")
    common.add_argument("--key", help="API key (default: $GLASSBOX_API_KEY, else the config file's api_key)")
    jobs = commands.add_parser(
        "jobs", help="list, follow, fetch and cancel your jobs on a server",
        description="Your jobs on a glassbox server. Exit codes: 0 ok / job completed or still running, "
                    "1 job ended in ERROR or CANCELLED, 2 usage, key or unknown job, 3 server unreachable, "
                    "4 job not finished yet.")
    sub = jobs.add_subparsers(dest="jobs_command", required=True)
    listing = sub.add_parser("list", parents=[common], help="your jobs, oldest first")
    listing.add_argument("--json", action="store_true", help="print the server's JSON answer")
    status = sub.add_parser("status", parents=[common], help="one job's status")
    status.add_argument("id")
    status.add_argument("--json", action="store_true", help="print the server's JSON answer")
    logs = sub.add_parser("logs", parents=[common], help="what a job printed")
    logs.add_argument("id")
    logs.add_argument("--follow", "-f", action="store_true", help="stream the output until the job ends")
    result = sub.add_parser("result", parents=[common], help="a finished job's saved values")
    result.add_argument("id")
    result.add_argument("--out", metavar="FILE.safetensors",
                        help="write the saved tensors to this safetensors file")
    cancel = sub.add_parser("cancel", parents=[common], help="cancel a queued or running job")
    cancel.add_argument("id")
    jobs.set_defaults(run=run_jobs)


def run_jobs(args: argparse.Namespace) -> int:
    from .config import Config

    settings = Config()  # read now, not at import: the environment of this command is what counts
    url = args.url or settings.HOST
    key = args.key or settings.API_KEY
    if not key:
        _say("no API key: pass --key, set GLASSBOX_API_KEY, or put `api_key = ...` in the config file "
             "(~/.config/glassbox/config); the server's operator creates keys with `glassbox keys create`")
        return USAGE
    command = {"list": _list, "status": _status, "logs": _logs, "result": _result, "cancel": _cancel}
    try:
        return command[args.jobs_command](url, key, args)
    except RemoteError as err:
        _say(str(err))
        code = err.status_code
        if code is None or code >= 500:
            return UNREACHABLE
        return NOT_FINISHED if code == 409 else USAGE


# ---------------------------------------------------------------- commands


def _list(url: str, key: str, args: argparse.Namespace) -> int:
    from .remote import transport

    # transport has no listing call (remote traces never list); its _request gives the same
    # error messages as every other call.
    body = transport._json(transport._request("GET", url, "/v1/jobs", api_key=key))
    jobs = body.get("jobs") or []
    if args.json:
        print(json.dumps(body, indent=2))
        return OK
    if not jobs:
        _say(f"no jobs for this API key at {url}")
        return OK
    rows = [("ID", "MODEL", "STATUS", "SUBMITTED", "RUN TIME", "ATTEMPTS")]
    rows += [(job["id"], job.get("model", ""), job.get("status", ""), _when(job.get("created")),
              _run_time(job), str(job.get("attempts", ""))) for job in jobs]
    _table(rows)
    return OK


def _status(url: str, key: str, args: argparse.Namespace) -> int:
    from .remote import transport

    state = transport.status(url, key, args.id)
    state.pop("logs", None)  # `jobs logs` shows them; here they would bury the status
    if args.json:
        print(json.dumps(state, indent=2))
    else:
        rows = [("id", state.get("id", args.id)), ("model", state.get("model", "")),
                ("status", state.get("status", ""))]
        if state.get("position") is not None:
            rows.append(("position", f"{state['position']} (jobs ahead in the queue)"))
        if state.get("status") == Status.QUEUED:
            rows.append(("starts in", _estimate(state.get("estimated_start_seconds"))))
        if state.get("note"):
            rows.append(("note", str(state["note"])))
        rows += [("submitted", _when(state.get("created"))), ("started", _when(state.get("started"))),
                 ("finished", _when(state.get("finished"))), ("run time", _run_time(state)),
                 ("attempts", str(state.get("attempts", ""))),
                 ("output", f"{state.get('log_length', 0):,} characters")]
        if state.get("error"):
            rows.append(("error", _error_line(state["error"])))
        width = max(len(name) for name, _ in rows)
        for name, value in rows:
            print(f"{name.ljust(width)}  {value}")
    return _exit_for(state.get("status"))


def _logs(url: str, key: str, args: argparse.Namespace) -> int:
    from .remote import transport

    if not args.follow:
        state = transport.status(url, key, args.id)
        sys.stdout.write(state.get("logs") or "")
        sys.stdout.flush()
        return _exit_for(state.get("status"), state.get("error"))
    final: dict = {}
    # The websocket a remote trace uses (polling if it cannot be opened); it ends with the final event.
    for event in transport.events(url, key, args.id):
        if event.get("log"):
            sys.stdout.write(event["log"])
            sys.stdout.flush()
        final = event
    return _exit_for(final.get("status"), final.get("error"))


def _result(url: str, key: str, args: argparse.Namespace) -> int:
    from .remote import transport
    from .remote.protocol import ProtocolError

    state = transport.status(url, key, args.id)
    if state.get("status") not in FINAL:
        _say(f"job {args.id} is {state.get('status')}: it has no result yet "
             f"(wait with `glassbox jobs logs {args.id} --follow`)")
        return NOT_FINISHED
    reply = transport.result(url, key, args.id)
    if not reply.ok:
        # A cancelled job's result says ERROR (type Cancelled); its status says CANCELLED.
        status = state.get("status") if state.get("status") != Status.COMPLETED else reply.status
        return _exit_for(status, reply.error or state.get("error"))
    try:
        decoded = reply.decoded()
    except ProtocolError as err:
        _say(f"the result of job {args.id} is unreadable: {err}")
        return UNREACHABLE
    values = dict(decoded["saved"])
    if decoded["result"] is not None:
        values["result"] = decoded["result"]
    tensors, others = _flatten(values)
    if args.out:
        import safetensors.torch

        metadata = {name: json.dumps(value) for name, value in others.items()}
        safetensors.torch.save_file(tensors, args.out, metadata=metadata or None)
        _say(f"wrote {len(tensors)} tensors to {args.out}"
             + (f" ({len(others)} other values are in its metadata, as JSON)" if others else ""))
        return OK
    rows = [("NAME", "KIND", "SHAPE", "DTYPE / VALUE")]
    rows += [(name, "tensor", "x".join(map(str, t.shape)) or "()", str(t.dtype).replace("torch.", ""))
             for name, t in tensors.items()]
    rows += [(name, type(value).__name__, "", _short(json.dumps(value))) for name, value in others.items()]
    _table(rows)
    if tensors:
        _say(f"write the tensors to a file with `glassbox jobs result {args.id} --out FILE.safetensors`")
    return OK


def _cancel(url: str, key: str, args: argparse.Namespace) -> int:
    from .remote import transport

    answer = transport.cancel(url, key, args.id)
    if answer.get("cancelled"):
        print(f"{args.id} CANCELLED")
        return OK
    print(f"{args.id} {answer.get('status')}")
    _say(f"job {args.id} had already finished ({answer.get('status')}): nothing to cancel")
    return OK if answer.get("status") == "CANCELLED" else JOB_FAILED


# ---------------------------------------------------------------- helpers


def _flatten(values: dict) -> tuple[dict, dict]:
    """Tensors by dotted path (``out.0``, ``acts.layer1``) for safetensors, and every other leaf
    (numbers, strings, None) as plain JSON. Each tensor is copied, contiguous and on the CPU:
    safetensors refuses views and tensors that share memory."""
    import numpy as np
    import torch

    tensors: dict[str, torch.Tensor] = {}
    others: dict[str, Any] = {}

    def walk(path: str, value: Any) -> None:
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(value)
        if isinstance(value, torch.Tensor):
            tensors[path] = value.detach().cpu().contiguous().clone()
        elif isinstance(value, dict) or hasattr(value, "items"):
            for name, item in value.items():
                walk(f"{path}.{name}", item)
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                walk(f"{path}.{index}", item)
        elif value is None or isinstance(value, (bool, int, float, str)):
            others[path] = value
        else:
            others[path] = repr(value)

    for name, value in values.items():
        walk(name, value)
    return tensors, others


def _exit_for(status: str | None, error: JobError | dict | None = None) -> int:
    if status == Status.ERROR:
        _say(f"the job failed: {_error_line(error)}" if error else "the job failed")
        return JOB_FAILED
    if status == Status.CANCELLED:
        _say("the job was cancelled")
        return JOB_FAILED
    return OK


def _error_line(error: Any) -> str:
    """One line for a job's error (a JobError, or the ``error`` of a status answer)."""
    if not isinstance(error, (dict, JobError)):
        return str(error)
    error = error if isinstance(error, JobError) else JobError.from_wire(error)
    message = error.message.strip()
    line = f"{error.type or 'Error'}: {message.splitlines()[0]}" if message else error.type
    if error.lineno:
        line += f" (line {error.lineno} of the block)"
    return line


def _estimate(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return "unknown (no finished jobs of this model to estimate from yet)"
    return f"~{_span(float(seconds))} (estimated from recent run times)"


def _span(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {round(seconds % 60)} s"
    return f"{seconds / 3600:.1f} h"


def _run_time(job: dict) -> str:
    started = job.get("started")
    if not started:
        return "-"
    return f"{(job.get('finished') or time.time()) - started:.2f} s"


def _when(stamp: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp)) if stamp else "-"


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def _say(text: str) -> None:
    print(f"[glassbox] {text}", file=sys.stderr, flush=True)
