"""The workers of one server: a local worker process, or every model's Ray replicas.

Offers:
    WorkerPool(config, store, on_event=None, say=None)
      .start()            start every worker; returns once all have loaded their models
      .wake()             a job was queued
      .cancel(job_id)     stop it wherever it runs; False if it runs nowhere
      .stop()
      .state / .models / .running_job / .replicas()   for /v1/health and /v1/models
      .size_models()      estimate each model's memory (for /v1/models; the lifespan calls it)

Layout::

    backend local:  WorkerPool ┬ Feeder ── LocalProcess (one process, every Hugging Face model)
                               └ Feeder ── LocalProcess(python=vllm_python) per engine = "vllm" model
                                           (its own process on vLLM's virtualenv, docs/vllm.md)
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
from ..plan import plan
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
            from .local import LocalProcess

            hf = [name for name in config.models if config.engine(name) == "hf"]
            channels = [LocalProcess(config, self.say, models=hf)] if hf else []
            channels += [LocalProcess(config, self.say, models=[name], python=config.vllm_interpreter())
                         for name in config.models if config.engine(name) == "vllm"]
        self.handles = [Feeder(config, store, on_event=on_event, say=self.say, channel=channel,
                                     solo=self.solo) for channel in channels]

    # ------------------------------------------------------------ control

    def start(self) -> None:
        """Start every worker (in parallel) and return once each has loaded its models; raise
        ``WorkerStartError`` with the first failure."""
        if self.config.memory_budget:
            self._check_budget()
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
        if not self.config.memory_budget:  # sized already otherwise; only /v1/models waits for it
            threading.Thread(target=self.size_models, name="glassbox-sizing", daemon=True).start()

    def _check_budget(self) -> None:
        """A catalog whose eager models (or any one model) cannot fit memory_budget fails at
        start, naming the model and the numbers (what `glassbox plan` says at its defaults: a
        worker's peak in one 128-token job), not at some later job."""
        try:
            sized = plan(self.config)
        except ValueError as err:
            raise WorkerStartError(f"cannot check the memory_budget: {err}") from None
        for handle in self.handles:
            for size in sized.sizes:
                handle.residency.record(size)
        if sized.problems:
            raise WorkerStartError("the models do not fit this server's memory_budget:\n  "
                                   + "\n  ".join(sized.problems))

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
        """Every served model: its description once loaded (class, parameters, ...), ``state``
        (``ready`` where any worker holds it, ``loading``, else ``cold``), estimated ``bytes``,
        ``last_used`` (a Unix time or None), ``load``, ``pinned`` and ``replicas``."""
        described: dict[str, dict] = {}
        for name in self.config.models:
            serving = [h for h in self.handles if name in h.channel.serves]
            info: dict[str, Any] = {}
            for handle in serving:
                info.update({k: v for k, v in handle.models.get(name, {}).items() if k not in info})
            states = [h.residency.describe(name) for h in serving]
            info.update(states[0] if states else {})
            for wanted in ("ready", "loading"):
                if any(state["state"] == wanted for state in states):
                    info["state"] = wanted
                    break
            used = [state["last_used"] for state in states if state.get("last_used")]
            info["last_used"] = max(used) if used else None
            info["replicas"] = len(serving)
            described[name] = info
        return described

    def size_models(self) -> None:
        """Estimate every model's memory (sizing.py, from its config) so that /v1/models shows it
        before any model had to be loaded on demand; a model that cannot be sized is left out."""
        for handle in self.handles:
            for name in handle.channel.serves:
                try:
                    handle.residency.size(name)
                except Exception as err:  # best effort: a hub id not in the cache, a custom model
                    self.say(f"cannot estimate the memory of {name}: {err}")

    @property
    def running_job(self) -> str | None:
        return next((h.running_job for h in self.handles if h.running_job is not None), None)

    def replicas(self) -> list[dict]:
        """One entry per worker: what it serves, its state, process id, the Ray node it runs on
        (``{"id", "ip"}``; None on the local backend), how many jobs it runs now."""
        return [{"label": h.channel.label, "models": list(h.channel.serves), "state": h.state,
                 "pid": h.pid, "node": getattr(h.channel, "node", None), "running": len(h.running),
                 "restarts": h.restarts, "batches": h.batches, "batched_jobs": h.batched_jobs}
                for h in self.handles]
