"""``remote="local"``: run a remote block in this process exactly as a server's worker runs it.

Offers:
    run_in_process(model, request, log=) -> JobResult

The client reaches this through the executor seam (``remote/executor.py``: ``run_locally`` frames
the request into the bytes that travel and reads it back, then calls this through the default
executor module). ``run_job`` (execute.py) compiles the block under the sandbox, runs it on
``model`` and encodes the saved values. So a block that runs here runs on a server: same wire
format, same restricted compile and guards, same values back. What a server adds around a job
is not here: its queue, wall-time and memory limits, the process confinement, and the weight
check after each job (the model is the caller's own; the sandbox still refuses writes to its
weights).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ...remote.job import JobRequest, JobResult
from .execute import run_job

__all__ = ["run_in_process"]


def run_in_process(model: Any, request: JobRequest, *, log: Callable[[str], None]) -> JobResult:
    """Run one job on ``model`` (named as the client named it)."""
    return run_job({model._remote_name(): model}, request, log=log, choose=_lookup)


def _lookup(models: dict[str, Any], name: Any) -> Any:
    if name not in models:
        raise LookupError(f"model {name!r} is not the model this block traces ({', '.join(models)})")
    return models[name]
