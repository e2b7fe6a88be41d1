"""The seam between the tracing core and whatever runs a job: the executor contract, declared here.

Offers:
    Executor             the Protocol an executor module implements (a server's workers take it
                         from ``--executor``; ``remote="local"`` from ``LOCAL_EXECUTOR``)
    DEFAULT_EXECUTOR     "glassbox.server.jobs.executor": the one glassbox ships
    load_executor(name)  import an executor module by name, checking it has ``run_job``
    run_locally(model, request, log=) -> JobResult   ``remote="local"``: one request run in this
                         process by the default executor, through the bytes a server would read
    seed_job(seed=0)     the random state every job on a server starts from

Why by name: the client must not import the server (the server imports the client's protocol;
the other direction would be a cycle, and a client install need not carry the server's sandbox
until someone asks for ``remote="local"``). A worker already finds its executor by module name
(``--executor``), so the client uses the same mechanism, declared in one place.

A module implementing ``Executor``::

    models = load_models(specs)                             {name: model}, at worker start
    result = run_job(models, request, log=print_fn, limits={...})          JobRequest -> JobResult
    results = run_batch(models, requests, logs=[...], limits={...})        optional: one pass
    run_host(models, requests, link_fds) / run_body(models, request, link_fd, log=, limits=, lone=False)
                                                            optional: one pass, split (the model's
                                                            process and each request's, apart)
    result = run_in_process(model, request, log=print_fn)   optional: ``remote="local"``
    after_job(models), load_model(name, spec), unload_model(models, name)  optional
    prepare_later_loads()                                   optional: before the worker is confined
    warm_up(models)                                         optional: after loading, before any job

``run_job`` / ``run_batch`` never raise for anything a job's code does: a failure is an ERROR
``JobResult``. ``limits`` holds ``max_result_bytes`` and ``max_saved_values``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Protocol

from .job import JobRequest, JobResult

__all__ = ["DEFAULT_EXECUTOR", "LOCAL_EXECUTOR", "Executor", "load_executor", "run_locally", "seed_job"]

DEFAULT_EXECUTOR = "glassbox.server.jobs.executor"
LOCAL_EXECUTOR = DEFAULT_EXECUTOR  # what remote="local" runs a block with


class Executor(Protocol):
    """What a worker (and ``remote="local"``) takes from an executor module (see the module docstring)."""

    def load_models(self, specs: dict[str, Any]) -> dict[str, Any]: ...

    def run_job(self, models: dict[str, Any], request: JobRequest, *,
                log: Callable[[str], None], limits: dict | None = None) -> JobResult: ...

    # Optional (looked up with getattr): run_batch(models, requests, *, logs, limits) -> [JobResult],
    # run_host(models, requests, link_fds) -> bool with run_body(models, request, link_fd, *, log,
    # limits, lone) -> JobResult (a forking worker then runs batches, and lone jobs that could share
    # a pass, split: server/workers/split.py),
    # run_in_process(model, request, *, log) -> JobResult, after_job(models), load_model(name, spec),
    # unload_model(models, name) and prepare_later_loads() (needed for load = "on_demand").


def load_executor(name: str) -> Any:
    """The executor module ``name``, checked to offer ``run_job``."""
    module = importlib.import_module(name)
    if not callable(getattr(module, "run_job", None)):
        raise TypeError(f"executor module {name!r} has no run_job(models, request, log=, limits=)")
    return module


def run_locally(model: Any, request: JobRequest, *, log: Callable[[str], None]) -> JobResult:
    """Run ``request`` on ``model`` in this process exactly as a worker would: the request is
    framed into the bytes that travel and read back, and so is the result."""
    executor = load_executor(LOCAL_EXECUTOR)
    run = getattr(executor, "run_in_process", None)
    if run is None:
        raise TypeError(f"executor module {LOCAL_EXECUTOR!r} cannot run a block in this process "
                        "(it has no run_in_process)")
    result = run(model, JobRequest.read(request.frame()), log=log)
    return JobResult.read(result.frame())


def seed_job(seed: int = 0) -> None:
    """Start a job from the random state every job here starts from (``torch.manual_seed(seed)``).

    Where no accelerator is initialised (a CPU server; every forked job process), only the CPU
    generator is seeded: ``torch.manual_seed`` would also queue a lazy CUDA seed, capturing the
    call's stack with ``traceback.format_stack`` each time, which took 3.3 ms in a freshly forked
    job process, most of a split body's start (tiny GPT-2, a probe in the body). Such a process
    cannot start CUDA anyway; where one could later, CUDA then starts from its own fixed default."""
    import torch

    if torch.cuda.is_initialized():
        torch.manual_seed(seed)
    else:
        torch.default_generator.manual_seed(seed)
