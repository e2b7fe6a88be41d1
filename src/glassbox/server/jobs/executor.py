"""The executor contract (what ``--executor`` names), and the default executor.

Offers:
    Executor            the Protocol a custom executor module implements
    load_models, run_job, run_batch, after_job      the default executor (this module is the
                                                    default ``--executor``)

A worker (``workers/child.py``) imports the executor module by name and calls::

    models = load_models(specs)                     once, at start: {name: model}; a spec is a
                                                    path or {"path": ..., "options": {...}}
    models[name] = load_model(name, spec)           optional (on-demand loading): one more model
    unload_model(models, name)                      optional: evict one, freeing its memory
    result, blob = run_job(models, envelope, blob, log=print_fn, limits={...})
    results = run_batch(models, [(envelope, blob), ...], logs=[print_fn, ...], limits={...})
                                                    optional: several jobs in one pass; without
                                                    it a batch runs job by job
    after_job(models)                               optional: after every job or batch, once
                                                    its replies are on their way (workers that
                                                    run each job in a process of its own skip it)

``run_job`` / ``run_batch`` never raise for anything a job's code does: a failure is an
``ERROR`` result envelope. ``limits`` holds ``max_result_bytes`` and ``max_saved_values``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from .cotenant import run_batch
from .execute import run_job
from .loading import load_model, load_models, unload_model
from .served import after_job

__all__ = ["Executor", "after_job", "load_model", "load_models", "run_batch", "run_job", "unload_model"]


class Executor(Protocol):
    """What a worker takes from the module named by ``--executor`` (see the module docstring)."""

    def load_models(self, specs: dict[str, Any]) -> dict[str, Any]: ...

    def run_job(self, models: dict[str, Any], envelope: dict, blob: bytes, *,
                log: Callable[[str], None], limits: dict | None = None) -> tuple[dict, bytes]: ...

    # Optional (looked up with getattr): run_batch(models, items, *, logs, limits), after_job(models),
    # load_model(name, spec) and unload_model(models, name) (needed for load = "on_demand").
