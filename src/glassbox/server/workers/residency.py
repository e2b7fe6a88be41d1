"""Which models a worker holds, and which to evict so that a cold one fits the memory budget.

Offers:
    Residency(config, sizes=None)   the models of one channel (local worker or Ray replica)
      .loaded(names) / .loading(name) / .evicted(name) / .failed(name) / .used(name)
      .is_ready(name) -> bool
      .to_evict(name) -> [names]     least recently used unpinned models to unload before ``name``
                                     loads; NoRoom if it cannot fit even then
      .describe(name) -> {"state", "bytes", "last_used", "pinned", "load"}   for /v1/models
                                     (``bytes``: the plan's loaded, a worker serving it alone)
    NoRoom                           a model does not fit the budget whatever is evicted

States: ``cold`` (not loaded: an ``on_demand`` model before its first job, or one evicted),
``loading``, ``ready``. Sizes are ``sizing.estimate``'s, computed once, from the models' configs
(no weights), when the first cold load needs them; what must fit the budget is the worker's peak
(``sizing.worker_bytes``: the process once, the models it holds, one 128-token job of the largest),
as ``glassbox plan`` checks it. Eviction happens only between jobs (a feeder runs one job or batch
at a time), so no running job ever loses its model.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from ..sizing import ModelSize, estimate, worker_bytes

__all__ = ["NoRoom", "Residency"]


class NoRoom(RuntimeError):
    """The model does not fit the memory budget even with every unpinned model evicted."""


class Residency:
    def __init__(self, config: Any, sizes: dict[str, ModelSize] | None = None) -> None:
        self.config = config
        self._sizes = dict(sizes or {})
        self._state = dict.fromkeys(config.models, "cold")
        self._last_used: dict[str, float | None] = dict.fromkeys(config.models)
        self._lock = threading.Lock()

    # ------------------------------------------------------------ what happened

    def loaded(self, names: Any) -> None:
        """The worker (re)started holding exactly ``names``."""
        with self._lock:
            for name in self._state:
                self._state[name] = "ready" if name in names else "cold"

    def loading(self, name: str) -> None:
        with self._lock:
            self._state[name] = "loading"

    def ready(self, name: str) -> None:
        with self._lock:
            self._state[name] = "ready"

    def evicted(self, name: str) -> None:
        with self._lock:
            self._state[name] = "cold"

    failed = evicted  # a load that failed leaves the model cold; the next job tries again

    def used(self, name: str) -> None:
        with self._lock:
            self._last_used[name] = time.time()

    def is_ready(self, name: str) -> bool:
        return self._state.get(name) == "ready"

    # ------------------------------------------------------------ deciding

    def size(self, name: str) -> ModelSize:
        """The model's estimated costs (``sizing.estimate``, for a 128-token job), computed once."""
        if name not in self._sizes:
            path = self.config.models[name]
            self._sizes[name] = estimate(name, path, self.config.load_options(name))
        return self._sizes[name]

    def record(self, size: ModelSize) -> None:
        """A size estimated elsewhere (the pool checks the budget at start with the same numbers)."""
        self._sizes[size.name] = size

    def to_evict(self, name: str) -> list[str]:
        """The models to unload, least recently used first, so that ``name`` fits the budget."""
        budget = self.config.memory_budget
        if not budget:
            return []
        with self._lock:
            held = [n for n, state in self._state.items() if state == "ready" and n != name]
            last = dict(self._last_used)
        pinned = [n for n in held if self.config.pinned(n)]
        need = worker_bytes([self.size(n) for n in [*pinned, name]])
        if need > budget:
            beside = f" beside the pinned models ({', '.join(pinned)})" if pinned else ""
            raise NoRoom(f"model {name!r} needs ~{_gib(need)} GiB at peak (estimated as `glassbox plan` does)"
                         f"{beside}, "
                         f"over this server's memory_budget of {_gib(budget)} GiB: ask the operator to "
                         "raise memory_budget or unpin a model")
        kept = list(held)
        evict = []
        for other in sorted((n for n in held if n not in pinned), key=lambda n: last.get(n) or 0.0):
            if worker_bytes([self.size(n) for n in [*kept, name]]) <= budget:
                break
            evict.append(other)
            kept.remove(other)
        return evict

    def describe(self, name: str) -> dict:
        info: dict[str, Any] = {"state": self._state.get(name, "cold"), "load": self.config.load_mode(name),
                                "pinned": self.config.pinned(name), "last_used": self._last_used.get(name)}
        if name in self._sizes:
            info["bytes"] = self._sizes[name].loaded_bytes
        return info


def _gib(size: int) -> str:
    return f"{size / 1024**3:.2f}"
