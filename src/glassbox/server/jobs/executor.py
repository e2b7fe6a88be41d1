"""The default executor (what ``--executor`` names unless an operator says otherwise).

Offers:
    load_models, load_model, unload_model, run_job, run_batch, run_host, run_body, run_in_process,
    after_job
        the functions of the ``Executor`` contract (declared in ``glassbox.remote.executor``,
        where a worker and ``remote="local"`` find executors by module name)

A worker (``workers/child.py``) calls::

    models = load_models(specs)                     once, at start: {name: model}; a spec is a
                                                    path or {"path": ..., "options": {...}}
    prepare_later_loads()                           before the worker is confined (on-demand loads)
    models[name] = load_model(name, spec)           on-demand loading: one more model
    unload_model(models, name)                      evict one, freeing its memory
    result = run_job(models, request, log=print_fn, limits={...})          JobRequest -> JobResult
    results = run_batch(models, [request, ...], logs=[print_fn, ...], limits={...})
                                                    several jobs in one pass, in this process
    run_host(models, [request, ...], [link_fd, ...])  a split batch (workers/split.py): the pass,
    result = run_body(models, request, link_fd, log=print_fn, limits={...}, lone=False)
                                                    and one request's code, each in a process of
                                                    its own (``lone``: a pass of one, its output live)
    warm_up(models)                                 after loading, before any job's process is forked
    after_job(models)                               after every job or batch, once its replies
                                                    are on their way (workers that run each job
                                                    in a process of its own skip it)

``run_job`` / ``run_batch`` never raise for anything a job's code does: a failure is an
``ERROR`` result. ``limits`` holds ``max_result_bytes`` and ``max_saved_values``.
"""

from __future__ import annotations

from .cotenant import run_batch
from .execute import run_job, warm_up
from .inprocess import run_in_process
from .loading import load_model, load_models, prepare_later_loads, unload_model
from .served import after_job
from .split_body import run_body
from .split_host import run_host

__all__ = ["after_job", "load_model", "load_models", "prepare_later_loads", "run_batch", "run_body",
           "run_host", "run_in_process", "run_job", "unload_model", "warm_up"]
