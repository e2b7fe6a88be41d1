"""A TEST-ONLY executor (``--executor gated_executor``): the default one, except that loading a
model on demand waits until the file ``$GLASSBOX_TEST_LOAD_GATE/<model>`` exists.

Offers:
    load_model (and the default executor's other functions)    what the server's worker calls
    gated_servers(root, {name: "eager" | "on_demand"}, count=1, db_url=None)
        a context manager: ``count`` real servers (one database) of tiny GPT-2 under those names,
        whose on-demand loads wait for ``root/gate/<name>``; yields (gate folder, [servers])

A test then sees a job while its model loads for as long as it needs to look (no race with a
fast load), and lets the load go on by creating that file. Serve with ``--isolation none``: a
confined worker could not look at the gate folder. Never use it outside the tests.
"""

from __future__ import annotations

import contextlib
import os
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
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

__all__ = ["after_job", "gated_servers", "load_model", "load_models", "run_batch", "run_in_process",
           "run_job", "unload_model"]

_WAIT = 900.0  # a gate never opened: load anyway rather than hang the worker forever (tests' HANG)


def load_model(name: str, spec: Any) -> Any:
    gate = os.environ.get("GLASSBOX_TEST_LOAD_GATE")
    if gate:
        deadline = time.monotonic() + _WAIT
        while not os.path.exists(os.path.join(gate, name)) and time.monotonic() < deadline:
            time.sleep(0.02)
    return _load_model(name, spec)


def _catalog(root: Path, models: dict[str, str]) -> Path:
    from glassbox.offline import tiny_gpt2_path

    path = root / "catalog.toml"
    path.write_text("".join(textwrap.dedent(f"""
        [models.{name}]
        path = "{tiny_gpt2_path()}"
        load = "{load}"
    """) for name, load in models.items()))
    return path


@contextlib.contextmanager
def gated_servers(root: Path, models: dict[str, str], count: int = 1, db_url: str | None = None) -> Iterator:
    """``count`` servers (one database) whose on-demand loads wait for ``root/gate/<model>``."""
    gate = root / "gate"
    gate.mkdir()
    args = ["--models-file", str(_catalog(root, models)), "--executor", "gated_executor",
            # max-seconds: only for a job that hangs (a test may look at a loading job for minutes)
            "--isolation", "none", "--max-batch", "1", "--max-seconds", "900", "--torch-threads", "1",
            *(["--db-url", db_url] if db_url else [])]
    import pytest

    from glassbox.cli import start_server

    started = []
    try:
        with pytest.MonkeyPatch.context() as patch:
            path = [os.path.dirname(os.path.abspath(__file__)), os.environ.get("PYTHONPATH")]
            patch.setenv("PYTHONPATH", os.pathsep.join(filter(None, path)))
            patch.setenv("GLASSBOX_TEST_LOAD_GATE", str(gate))
            for n in range(count):
                started.append(start_server({}, state_dir=str(root / f"state{n}"), args=args))
        yield gate, started
    finally:
        for server in started:
            server.stop()
