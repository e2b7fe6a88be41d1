"""A TEST-ONLY executor (``--executor raw_executor``): runs a job's source as raw, unsandboxed Python.

It stands for the day the in-process sandbox is escaped: everything the OS confinement, the
per-job process and the read-only weights promise must hold against this. The job's source runs
with ``model`` (the served LanguageModel), ``torch``, ``prompt`` (its input) and ``out`` (a dict
it fills); ``out`` comes back as the saved value ``out``. Never use it outside the tests.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from glassbox.remote.job import JobRequest, JobResult
from glassbox.remote.protocol import encode_values
from glassbox.server.jobs.executor import load_models

__all__ = ["load_models", "run_job"]


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
