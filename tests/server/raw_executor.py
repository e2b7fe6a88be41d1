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

from glassbox.remote.protocol import (
    JOB_KIND,
    RESULT_KIND,
    check_envelope,
    decode_values,
    encode_values,
    make_envelope,
)
from glassbox.server.jobs.executor import load_models

__all__ = ["load_models", "run_job"]


def run_job(models: dict[str, Any], envelope: dict, blob: bytes, *, log: Callable[[str], None],
            limits: dict | None = None) -> tuple[dict, bytes]:
    payload = check_envelope(envelope, JOB_KIND, receiver="server")
    values = decode_values(payload["values"], blob, numpy_as_tensor=True)
    out: dict[str, Any] = {}
    namespace = {"model": models[payload["model"]], "torch": torch, "out": out, "print": log,
                 "prompt": (values.get("inputs") or [""])[0]}
    try:
        exec(compile(payload["source"], "<raw job>", "exec"), namespace)
    except Exception as err:
        reply = {"status": "ERROR", "error": {"type": type(err).__name__, "message": str(err),
                                              "lineno": None, "line": None}}
        return make_envelope(RESULT_KIND, reply), b""
    desc, out_blob = encode_values({"saved": {"out": out}, "result": None})
    return make_envelope(RESULT_KIND, {"status": "COMPLETED", "values": desc, "unsaved": []}), out_blob
