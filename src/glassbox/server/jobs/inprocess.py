"""``remote="local"``: run a remote block in this process exactly as a server's worker runs it.

Offers:
    run_in_process(model, envelope, blob, log=) -> (result envelope, blob)

The request is what a client sends a server, framed into the bytes that travel and
unframed again; ``run_job`` (execute.py) decodes it, compiles the block under the
sandbox, runs it on ``model`` and encodes the saved values; the reply is framed and
unframed the same way. So a block that runs here runs on a server: same wire
format, same restricted compile and guards, same values back. What a server adds
around a job is not here: its queue, wall-time and memory limits, the process
confinement, and the weight check after each job (the model is the caller's own;
the sandbox still refuses writes to its weights).

The client reaches this module by a lazy import on the ``remote="local"`` path
only; it imports nothing that imports the client back (served.py leaves model
loading to loading.py for that reason), so the import graph has no cycle.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ...remote.framing import frame, unframe
from .execute import run_job

__all__ = ["run_in_process"]


def run_in_process(model: Any, envelope: dict, blob: bytes, *,
                   log: Callable[[str], None]) -> tuple[dict, bytes]:
    """Run one job on ``model`` (named as the client named it) and return the reply as a
    client would receive it."""
    name = model._remote_name()
    request, request_blob = unframe(frame(envelope, blob))  # exactly what a server would read
    reply, reply_blob = run_job({name: model}, request, request_blob, log=log, choose=_lookup)
    return unframe(frame(reply, reply_blob))


def _lookup(models: dict[str, Any], name: Any) -> Any:
    if name not in models:
        raise LookupError(f"model {name!r} is not the model this block traces ({', '.join(models)})")
    return models[name]
