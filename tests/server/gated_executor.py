"""A TEST-ONLY executor (``--executor gated_executor``): the default one, except that loading a
model on demand waits until the file ``$GLASSBOX_TEST_LOAD_GATE/<model>`` exists.

A test then sees a job while its model loads for as long as it needs to look (no race with a
fast load), and lets the load go on by creating that file. Serve with ``--isolation none``: a
confined worker could not look at the gate folder. Never use it outside the tests.
"""

from __future__ import annotations

import os
import time
from typing import Any

from glassbox.server.jobs.executor import (
    after_job,
    load_models,
    run_batch,
    run_in_process,
    run_job,
    unload_model,
)
from glassbox.server.jobs.executor import load_model as _load_model

__all__ = ["after_job", "load_model", "load_models", "run_batch", "run_in_process", "run_job", "unload_model"]

_WAIT = 600.0  # a gate never opened: load anyway rather than hang the worker forever


def load_model(name: str, spec: Any) -> Any:
    gate = os.environ.get("GLASSBOX_TEST_LOAD_GATE")
    if gate:
        deadline = time.monotonic() + _WAIT
        while not os.path.exists(os.path.join(gate, name)) and time.monotonic() < deadline:
            time.sleep(0.02)
    return _load_model(name, spec)
