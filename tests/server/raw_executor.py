"""A TEST-ONLY executor (``--executor raw_executor``): runs a job's source as raw, unsandboxed Python.

It stands for the day the in-process sandbox is escaped: everything the OS confinement, the
per-job process and the read-only weights promise must hold against this. The job's source runs
with ``model`` (the served LanguageModel), ``torch``, ``prompt`` (its input) and ``out`` (a dict
it fills); ``out`` comes back as the saved value ``out``. Never use it outside the tests.

A co-tenant batch runs split as with the default executor (``run_host`` is the real host: it runs
no job's code), and each request's body runs raw in its own process (``run_body``): its source is
the block's body, with ``model``'s values served by the host (``model.active`` is the host's view);
a body that leaves the pass, or whose pass fails, runs again alone in its process. A lone job runs
as a pass of one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from glassbox.remote.job import JobRequest, JobResult
from glassbox.remote.protocol import encode_values
from glassbox.server.jobs.executor import load_models, run_host
from glassbox.server.jobs.split_body import HostView, NeedsAlone
from glassbox.server.jobs.split_link import Link

__all__ = ["load_models", "run_body", "run_host", "run_job"]


def run_job(models: dict[str, Any], request: JobRequest, *, log: Callable[[str], None],
            limits: dict | None = None) -> JobResult:
    values = request.decoded(numpy_as_tensor=True)
    out: dict[str, Any] = {}
    namespace = {"model": models[request.model], "torch": torch, "out": out, "print": log,
                 "prompt": (values.inputs or [""])[0]}
    try:
        exec(compile(request.source, "<raw job>", "exec"), namespace)
    except Exception as err:
        return JobResult.failed(type(err).__name__, str(err))
    desc, out_blob = encode_values({"saved": {"out": out}, "result": None})
    return JobResult.completed(desc, [], out_blob)


def run_body(models: dict[str, Any], request: JobRequest, link_fd: int, *, log: Callable[[str], None],
             limits: dict | None = None, lone: bool = False) -> JobResult:
    model = models[request.model]
    view = HostView(model, Link.from_fd(link_fd))
    model.active = view
    try:
        result = run_job(models, request, log=log, limits=limits)
        if result.ok:
            view.hand_back()
        stood = view.stood() if result.ok else True
    except NeedsAlone:
        stood = False
    finally:
        model.active = None
    if not stood:  # as the real body does: the whole job again, alone, in this process
        return run_job(models, request, log=log, limits=limits)
    return result
