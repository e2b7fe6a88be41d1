"""The workers of one server: a local worker process, or every model's Ray replicas.

Offers:
    WorkerPool(config, store, on_event=None, say=None)
      .start()            start every worker; returns once all have loaded their models
      .wake()             a job was queued
      .cancel(job_id)     stop it wherever it runs; False if it runs nowhere
      .stop()
      .state / .models / .running_job / .replicas()   for /v1/health and /v1/models

Layout::

    backend local:  WorkerPool ── Feeder ── LocalProcess (one process, every model)
    backend ray:    WorkerPool ─┬ Feeder ── RayReplica(smollm2, 0) ── Ray actor
                                ├ Feeder ── RayReplica(smollm2, 1) ── Ray actor
                                └ Feeder ── RayReplica(gpt2, 0)    ── Ray actor

Every handle feeds itself from the one job store (claims are atomic), so a free replica takes
the next job for its model; the handles share the set of jobs that must run alone.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from ..config import ServerConfig
from ..store import JobStore
from .channel import WorkerStartError
from .feeder import Feeder

__all__ = ["WorkerPool"]


class WorkerPool:
    """All workers of a server, seen as one (see the module docstring).

        pool = WorkerPool(ServerConfig(models={"gpt2": path}), store)
        pool.start()
    """

    def __init__(
        self,
        config: ServerConfig,
        store: JobStore,
        *,
        on_event: Callable[[str, dict], None] | None = None,
        say: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.say = say or (lambda text: None)
        self.solo: set[str] = set()
        self._backend: Any = None
        if config.backend == "ray":
            from .ray_replicas import RayBackend

            self._backend = RayBackend(config, self.say)
            channels = self._backend.channels()
        else:
            channels = [None]  # Feeder's default: one LocalProcess for every model
        self.handles = [Feeder(config, store, on_event=on_event, say=self.say, channel=channel,
                                     solo=self.solo) for channel in channels]

    # ------------------------------------------------------------ control

    def start(self) -> None:
        """Start every worker (in parallel) and return once each has loaded its models; raise
        ``WorkerStartError`` with the first failure."""
        if self._backend is not None:
            self._backend.connect()
        errors: list[BaseException] = []

        def start(handle: Feeder) -> None:
            try:
                handle.start()
            except BaseException as err:  # reported below, in the caller's thread
                errors.append(err)

        threads = [threading.Thread(target=start, args=(h,), name="glassbox-start") for h in self.handles]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            self.stop()
            raise errors[0] if isinstance(errors[0], WorkerStartError) else WorkerStartError(str(errors[0]))

    def wake(self) -> None:
        for handle in self.handles:
            handle.wake()

    def cancel(self, job_id: str) -> bool:
        return any(handle.cancel(job_id) for handle in self.handles)

    def stop(self) -> None:
        for handle in self.handles:
            handle.stop()
        if self._backend is not None:
            self._backend.disconnect()

    # ------------------------------------------------------------ state

    @property
    def state(self) -> str:
        """ready (every worker is), starting, restarting (one is replacing a killed worker),
        failed (one could not start; it keeps retrying), or stopped."""
        states = {handle.state for handle in self.handles}
        for state in ("failed", "starting", "restarting", "stopped"):
            if state in states:
                return state
        return "ready"

    @property
    def models(self) -> dict[str, dict]:
        described: dict[str, dict] = {}
        for handle in self.handles:
            for name, info in handle.models.items():
                described.setdefault(name, dict(info))
        for name in described:
            described[name]["replicas"] = sum(name in h.channel.serves for h in self.handles)
        return described

    @property
    def running_job(self) -> str | None:
        return next((h.running_job for h in self.handles if h.running_job is not None), None)

    def replicas(self) -> list[dict]:
        """One entry per worker: what it serves, its state, process id, how many jobs it runs now."""
        return [{"label": h.channel.label, "models": list(h.channel.serves), "state": h.state,
                 "pid": h.pid, "running": len(h.running), "restarts": h.restarts, "batches": h.batches,
                 "batched_jobs": h.batched_jobs}
                for h in self.handles]
