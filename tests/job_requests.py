"""The one way tests build a job request by hand (as a client would send it) and read a result.

Offers:
    job_request(source, ...) -> JobRequest      ``.frame()`` gives the bytes POST /v1/jobs takes
    saved(result) -> dict                        a completed JobResult's saved values (None if it failed)

Tests that go through ``with model.trace(..., remote=True)`` need none of this; these are for the
tests that talk to the API, the feeder, the worker or the executor directly (hostile requests,
requests no client would make, one layer at a time).
"""

from __future__ import annotations

from typing import Any

from glassbox.remote.job import JobRequest, JobResult
from glassbox.remote.protocol import encode_values


def job_request(source: str, *, model: str = "gpt2", inputs: tuple | list = ("Hello",),
                call: dict | None = None, values: dict | None = None, method: str = "trace",
                model_refs: dict | None = None, modules: dict | None = None, returns: tuple | list = (),
                writes: tuple | list | None = None, filename: str = "<test>", first_line: int = 2,
                tracer_name: str = "tracer", timeout: float | None = None) -> JobRequest:
    """A request whose block is ``source``: the served model is ``model`` in the block (change
    with ``model_refs``), ``torch`` and ``glassbox`` are imported (``modules``), the trace input is
    ``inputs`` and ``returns`` (default: the names the block may save) come back when saved."""
    desc, blob = encode_values({"vars": values or {}, "inputs": list(inputs), "call": call or {}})
    return JobRequest(
        model=model, method=method, source=source, filename=filename, first_line=first_line,
        tracer_name=tracer_name, model_refs={"model": ""} if model_refs is None else model_refs,
        modules={"torch": "torch", "glassbox": "glassbox"} if modules is None else modules,
        values=desc, writes=tuple(returns if writes is None else writes), returns=tuple(returns),
        timeout=timeout, blob=blob,
    )


def saved(result: JobResult) -> dict[str, Any] | None:
    """The saved values of a completed job, by name (None when it did not complete)."""
    return result.decoded()["saved"] if result.ok else None
