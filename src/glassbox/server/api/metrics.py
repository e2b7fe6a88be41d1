"""``GET /metrics``: the server in Prometheus' text format, for an operator key only.

Offers:
    router                    GET /metrics   (``Authorization: Bearer <operator key>``; 401 without a
                              valid key, 403 for a key that is not an operator's)
    ServerMetrics(store, config)
      .watch(publish) -> on_event   wraps the pool's event callback to time the jobs that finish here
      .attach(pool)                 the workers whose counters are read at scrape time
      .scrape() -> bytes            the exposition text (``CONTENT_TYPE_LATEST``)

Who may scrape (decision): an operator key (``glassbox keys create NAME --operator``), always. Not
"no key from loopback": a reverse proxy on the same host makes every request come from 127.0.0.1,
so trusting the peer address would open per-key usage to the internet. Prometheus sends the key
with ``authorization: {credentials_file: ...}`` (docs/metrics.md). A user key gets 403: even totals
reveal other tenants' activity.

What is read where. Nothing is kept in this module but the two histograms; everything else is read
when scraped, so the numbers cannot drift from the store or the feeders:

    database-wide (the same on every API process sharing the database: take max(), not sum(),
    across instances)
        glassbox_jobs{model,status}           jobs the store holds (finished ones until they expire,
                                              result_ttl_seconds after they finished)
        glassbox_queue_length{model}          QUEUED jobs
        glassbox_queue_oldest_wait_seconds{model}   how long the longest-waiting queued job has waited
        glassbox_key_jobs{key,status}         per key NAME (an operator chose it): jobs in the store
        glassbox_key_result_bytes{key}        bytes its jobs hold: results, errors, printed output
                                              (what its quota counts)
    per process (this API process's workers: sum() across instances)
        glassbox_job_run_seconds{model,status}      histogram: start to end of each job run here
        glassbox_job_queue_wait_seconds{model}      histogram: submission to the start of the run that
                                                    finished it (observed when the job finishes)
        glassbox_worker_state{worker,state} / _restarts_total / _running_jobs / _pid / _memory_bytes
        glassbox_batches_total{worker} / glassbox_batched_jobs_total{worker}   co-tenant batches of
                                              more than one job, and the jobs they held (mean batch
                                              size = rate of the second / rate of the first)
        glassbox_model_state{model,state} / _estimated_bytes / _parameters / _replicas /
        glassbox_model_last_used_timestamp_seconds
        glassbox_info{version,backend}, glassbox_max_batch

No label ever holds a job id, a job's code, values, output or error, or an API key: models and key
names come from the operator's catalog and ``glassbox keys``; a job's model must be served before
the store takes it (jobs_routes.py), so a tenant cannot make up a model label either.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

from fastapi import APIRouter, HTTPException, Request, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ...remote.job import Status
from ...version import __version__
from ..config import ServerConfig
from ..job_rows import Finished
from ..store import JobStore
from ..workers.feeder import FINISHED
from ..workers.local import LocalProcess
from .auth import ApiKey, in_thread

__all__ = ["ServerMetrics", "router"]

_RUN_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
_WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
_MODEL_STATES = ("cold", "loading", "ready")
_WORKER_STATES = ("starting", "ready", "restarting", "failed", "stopped")
_DELETED_KEY = "(deleted key)"

router = APIRouter()


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request, key: ApiKey) -> Response:
    if not key.operator:
        raise HTTPException(403, "/metrics needs an operator key (glassbox keys create NAME --operator): "
                                 "it shows every tenant's activity")
    body = await in_thread(request.app.state.metrics.scrape)
    return Response(body, media_type=CONTENT_TYPE_LATEST, headers={"Cache-Control": "no-store"})


class ServerMetrics:
    """The metrics of one API process (see the module docstring); its own registry, so that several
    apps in one process (tests) do not share counters.

        metrics = ServerMetrics(store, config)
        pool = WorkerPool(config, store, on_event=metrics.watch(hub.publish))
        metrics.attach(pool)
        text = metrics.scrape().decode()
    """

    def __init__(self, store: JobStore, config: ServerConfig) -> None:
        # No *_created series beside each histogram (a process-wide switch of the library; nothing
        # else in a server process uses it): they double the series and Prometheus reads none of them.
        disable_created_metrics()
        self.store = store
        self.config = config
        self.pool: Any = None
        self.registry = CollectorRegistry(auto_describe=True)
        self.run_seconds = Histogram(
            "glassbox_job_run_seconds", "Run time of the jobs that finished on this process's workers "
            "(start of the run that finished it to its end), by model and final status",
            ["model", "status"], buckets=_RUN_BUCKETS, registry=self.registry)
        self.queue_wait = Histogram(
            "glassbox_job_queue_wait_seconds", "Time from submission to the start of the run, of the jobs "
            "that finished on this process's workers (observed when they finish)",
            ["model"], buckets=_WAIT_BUCKETS, registry=self.registry)
        self.registry.register(_Collector(self))

    def attach(self, pool: Any) -> None:
        self.pool = pool

    def watch(self, publish: Callable[[str, dict], None]) -> Callable[[str, dict], None]:
        """``publish`` (the hub's), which also times each job that reaches a final status here."""

        def on_event(job_id: str, event: dict) -> None:
            finished = event.pop(FINISHED, None)
            publish(job_id, event)
            if finished is not None:
                with contextlib.suppress(Exception):  # metrics must never stop a feeder
                    self._finished(finished)

        return on_event

    def _finished(self, row: Finished) -> None:
        # The times as the store's finish() wrote and returned them: no query on the feeder's thread.
        if row.started is None:
            return  # cancelled before it ran: it never waited for a worker
        self.run_seconds.labels(row.model, str(row.status)).observe(max(0.0, row.finished - row.started))
        self.queue_wait.labels(row.model).observe(max(0.0, row.started - row.created))

    def scrape(self) -> bytes:
        return generate_latest(self.registry)


class _Collector(Collector):
    """Reads the store and the feeders on every scrape (see the module docstring)."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[Metric]:
        return []  # nothing to check at registration; collect() runs only when scraped

    def collect(self) -> Iterator[Metric]:
        config = self.metrics.config
        info = GaugeMetricFamily("glassbox_info", "This server: its version and backend",
                                 labels=["version", "backend"])
        info.add_metric([__version__, config.backend], 1)
        yield info
        yield GaugeMetricFamily("glassbox_max_batch", "Most jobs one co-tenant batch may hold (max_batch)",
                                value=config.max_batch)
        yield from self._store_metrics()
        if self.metrics.pool is not None:
            yield from self._worker_metrics(self.metrics.pool)
            yield from self._model_metrics(self.metrics.pool)

    # ------------------------------------------------------------ database-wide

    def _store_metrics(self) -> Iterator[Metric]:
        store, now = self.metrics.store, time.time()
        tallies = store.tallies()
        keys = store.list_keys()

        models = sorted(set(self.metrics.config.models) | {model for model, _ in tallies.by_model})
        counts, oldest = tallies.by_model, tallies.oldest_queued
        jobs = GaugeMetricFamily("glassbox_jobs", "Jobs the store holds (database-wide; finished ones until "
                                 "they expire), by model and status", labels=["model", "status"])
        queue = GaugeMetricFamily("glassbox_queue_length", "Queued jobs (database-wide), by model",
                                  labels=["model"])
        wait = GaugeMetricFamily("glassbox_queue_oldest_wait_seconds", "How long the longest-waiting queued "
                                 "job has waited (database-wide; 0: none queued), by model", labels=["model"])
        for model in models:
            for status in Status:
                jobs.add_metric([model, status.value], counts.get((model, status.value), 0))
            queue.add_metric([model], counts.get((model, Status.QUEUED.value), 0))
            wait.add_metric([model], max(0.0, now - oldest[model]) if oldest.get(model) else 0.0)
        yield from (jobs, queue, wait)

        # Several keys may share a name (one revoked, then made again): their usage adds up.
        names = {info.id: info.name for info in keys}
        per_key: dict[tuple[str, str], int] = defaultdict(int)
        for (key_id, status), n in tallies.by_key.items():
            per_key[(names.get(key_id, _DELETED_KEY), status)] += n
        bytes_of: dict[str, int] = dict.fromkeys((info.name for info in keys if info.revoked is None), 0)
        for key_id, size in tallies.stored_by_key.items():
            name = names.get(key_id, _DELETED_KEY)
            bytes_of[name] = bytes_of.get(name, 0) + size
        key_jobs = GaugeMetricFamily("glassbox_key_jobs", "Jobs the store holds (database-wide), by API key "
                                     "name and status", labels=["key", "status"])
        for (name, status), n in sorted(per_key.items()):
            key_jobs.add_metric([name, status], n)
        key_bytes = GaugeMetricFamily("glassbox_key_result_bytes", "Bytes the key's jobs hold in the "
                                      "store: results, errors, printed output (database-wide; what "
                                      "max_stored_bytes_per_key counts), by API key name", labels=["key"])
        for name, size in sorted(bytes_of.items()):
            key_bytes.add_metric([name], size)
        yield from (key_jobs, key_bytes)

    # ------------------------------------------------------------ this process

    def _worker_metrics(self, pool: Any) -> Iterator[Metric]:
        labels = ["worker"]
        state = GaugeMetricFamily("glassbox_worker_state", "1 for the worker's current state",
                                  labels=["worker", "state"])
        restarts = CounterMetricFamily("glassbox_worker_restarts", "Times the worker was started again "
                                       "(after a crash, a kill to stop a job, a lost Ray node)",
                                       labels=labels)
        running = GaugeMetricFamily("glassbox_worker_running_jobs", "Jobs the worker runs now", labels=labels)
        pid = GaugeMetricFamily("glassbox_worker_pid", "The worker's process id (on its Ray node for a "
                                "replica)", labels=labels)
        memory = GaugeMetricFamily("glassbox_worker_memory_bytes", "Resident memory of a local worker "
                                   "process (its models, the runtime, a job's tensors while one runs)",
                                   labels=labels)
        batches = CounterMetricFamily("glassbox_batches", "Co-tenant batches of more than one job run",
                                      labels=labels)
        batched = CounterMetricFamily("glassbox_batched_jobs", "Jobs those batches held", labels=labels)
        for index, handle in enumerate(pool.handles):
            worker = [_worker_name(index, handle.channel)]
            for name in _WORKER_STATES:
                state.add_metric([*worker, name], 1 if handle.state == name else 0)
            restarts.add_metric(worker, handle.restarts)
            running.add_metric(worker, len(handle.running))
            batches.add_metric(worker, handle.batches)
            batched.add_metric(worker, handle.batched_jobs)
            if handle.pid is not None:
                pid.add_metric(worker, handle.pid)
                rss = _rss(handle.pid) if isinstance(handle.channel, LocalProcess) else None
                if rss is not None:
                    memory.add_metric(worker, rss)
        yield from (state, restarts, running, pid, memory, batches, batched)

    def _model_metrics(self, pool: Any) -> Iterator[Metric]:
        labels = ["model"]
        state = GaugeMetricFamily("glassbox_model_state", "1 for the model's current state (ready where "
                                  "any worker holds it)", labels=["model", "state"])
        size = GaugeMetricFamily("glassbox_model_estimated_bytes", "Memory the model needs loaded, as "
                                 "`glassbox plan` estimates it", labels=labels)
        params = GaugeMetricFamily("glassbox_model_parameters", "Parameters of the loaded model",
                                   labels=labels)
        replicas = GaugeMetricFamily("glassbox_model_replicas", "Workers that serve the model",
                                     labels=labels)
        used = GaugeMetricFamily("glassbox_model_last_used_timestamp_seconds", "When a job last ran on "
                                 "the model (Unix time)", labels=labels)
        for name, described in pool.models.items():
            for wanted in _MODEL_STATES:
                state.add_metric([name, wanted], 1 if described.get("state") == wanted else 0)
            if isinstance(described.get("bytes"), int):
                size.add_metric([name], described["bytes"])
            if isinstance(described.get("parameters"), int):
                params.add_metric([name], described["parameters"])
            replicas.add_metric([name], int(described.get("replicas") or 0))
            if described.get("last_used"):
                used.add_metric([name], float(described["last_used"]))
        yield from (state, size, params, replicas, used)


def _worker_name(index: int, channel: Any) -> str:
    """A name that survives restarts (a pid would start a new series each time): the Ray replica's
    model#index, ``local`` for the Hugging Face worker, ``vllm:MODEL`` for a vLLM one."""
    model, replica = getattr(channel, "model", None), getattr(channel, "index", None)
    if isinstance(model, str) and isinstance(replica, int):
        return f"{model}#{replica}"
    if isinstance(channel, LocalProcess):
        return f"vllm:{channel.serves[0]}" if channel.python is not None and channel.serves else "local"
    return f"worker{index}"


def _rss(pid: int) -> int | None:
    """VmRSS of a process on this host (Linux); None where /proc cannot tell."""
    try:
        with open(f"/proc/{pid}/status") as file:
            for line in file:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
