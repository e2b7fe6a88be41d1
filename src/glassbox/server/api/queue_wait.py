"""How long a queued job probably waits before it starts: ``estimated_start_seconds`` in its status.

Offers:
    estimate_start(store, replicas, job) -> seconds | None     one queued job (REST, websocket)
    queue_estimates(store, replicas, queued) -> {id: seconds | None}
                                        the whole queue in one pass (the operator's dashboard)
    replicas_of(app_state) -> [dict]    the workers of this API process, for the two above
    HISTORY                             how many finished jobs of a model the estimate reads

The estimator, from measured run times (the README says the same):

    typical(m) = the median run time (claim to end: a model load is included) of model m's newest
                 HISTORY COMPLETED jobs, of any API key. A median, so that one cold load or one
                 long job moves it little.
    wait(J)    = ( the sum of typical(model) over the queued jobs ahead of J that J's workers serve
                 + the sum of max(typical(model) - running for, 0) over the jobs they run now )
                 / the number of workers serving J's model (the local worker process, or the
                 model's Ray replicas)

No estimate (None) while J's model has no COMPLETED job yet or no worker serves it; a job ahead
whose model has no history yet counts as typical(J's model). It is a guess, not a promise, and
errs high: a co-tenant batch runs several of the jobs ahead in one pass, jobs that fail are not
counted, and with several API processes on one database only the answering process's workers
are counted (every process's running jobs are). Other tenants enter only as counts and
durations: no job id, key or model of theirs leaves the server through it.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from ...remote.job import Status
from ..store import JobInfo, JobStore

__all__ = ["HISTORY", "estimate_start", "queue_estimates", "replicas_of"]

HISTORY = 20


def estimate_start(store: JobStore, replicas: list[dict], job: JobInfo,
                   now: float | None = None) -> float | None:
    """Seconds until the queued ``job`` probably starts (see the module docstring); None when
    there is no estimate (not queued, no history of its model, no worker serves it)."""
    if job.status != Status.QUEUED:
        return None
    workers, together = _serving(replicas, job.model)
    if not workers:
        return None
    ahead = store.ahead_of(job.id)
    if ahead is None:
        return None
    running = _running(store, together)
    typical = _typical(store, {job.model, *ahead, *(model for model, _ in running)} & together)
    own = typical.get(job.model)
    if own is None:
        return None
    return _seconds(_ahead(ahead, typical, own, together) + _remaining(running, typical, own, now), workers)


def queue_estimates(store: JobStore, replicas: list[dict], queued: list[JobInfo],
                    now: float | None = None) -> dict[str, float | None]:
    """``estimate_start`` of every job of ``queued`` (the whole queue, first to run first)."""
    groups = {model: _serving(replicas, model) for model in {job.model for job in queued}}
    served = set().union(*(together for _, together in groups.values())) if groups else set()
    running = _running(store, served)
    typical = _typical(store, served)
    counts: dict[str, int] = {}  # model -> queued jobs of that model before this one
    estimates: dict[str, float | None] = {}
    for job in queued:
        workers, together = groups[job.model]
        own = typical.get(job.model)
        if not workers or own is None:
            estimates[job.id] = None
        else:
            mine = [(model, started) for model, started in running if model in together]
            work = _ahead(counts, typical, own, together) + _remaining(mine, typical, own, now)
            estimates[job.id] = _seconds(work, workers)
        counts[job.model] = counts.get(job.model, 0) + 1
    return estimates


def _serving(replicas: list[dict], model: str) -> tuple[int, set[str]]:
    """How many workers serve ``model``, and every model those workers serve (whose jobs delay it)."""
    serving = [replica for replica in replicas if model in (replica.get("models") or ())]
    together = {model}
    for replica in serving:
        together.update(replica.get("models") or ())
    return len(serving), together


def _running(store: JobStore, models: set[str]) -> list[tuple[str, float]]:
    return [(job.model, job.started) for job in store.recent_jobs((Status.RUNNING,), limit=500)
            if job.model in models and job.started is not None]


def _typical(store: JobStore, models: set[str]) -> dict[str, float]:
    durations = store.recent_durations(sorted(models), limit=HISTORY)
    return {model: statistics.median(values) for model, values in durations.items() if values}


def _ahead(counts: dict[str, int], typical: dict[str, float], own: float, together: set[str]) -> float:
    return sum(count * typical.get(model, own) for model, count in counts.items() if model in together)


def _remaining(running: list[tuple[str, float]], typical: dict[str, float], own: float,
               now: float | None) -> float:
    now = time.time() if now is None else now
    return sum(max(typical.get(model, own) - (now - started), 0.0) for model, started in running)


def _seconds(work: float, workers: int) -> float:
    return round(work / max(workers, 1), 2)


def replicas_of(state: Any) -> list[dict]:
    """The workers of this API process (``WorkerPool.replicas()``), [] if it has none."""
    try:
        return list(state.worker.replicas())
    except Exception:  # a worker pool that cannot describe itself: no estimate, not an error
        return []
