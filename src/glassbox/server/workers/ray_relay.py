"""Inside a Ray replica: the model and its jobs in a worker process of the replica's own, which the
replica only relays to, so ``--backend ray`` runs with the server's isolation (the default:
``process``) instead of every job in the actor.

Offers:
    WorkerRelay(config, put)   the replica's local worker (``local.LocalProcess`` for the models of
                               ``config``, with ``config.isolation``); ``.start() -> ready``
                               message (or ``failed``), ``.send(message, blob)``; every message the
                               worker sends goes to ``put(framed bytes)`` (the actor's outbox)
    worker_config(config, model) -> ServerConfig
                               what a replica's worker is told: one model, no database URL

Why a worker process and not the actor itself: a Ray actor is a process with Ray's threads and
sockets (its core worker, gRPC), so it can be neither OS-confined nor forked per job; the worker
it spawns is a fresh interpreter like the local backend's (``spawn``, not fork), which loads the
model, confines itself and forks each job's process from its zygote exactly as on one machine
(``local.py``, ``zygote.py``). The actor runs no user code and holds no model. What the replica
sends the API process is what the worker sent, checked by the worker (``forked.py``).

If the worker dies, the replica exits too: the feeder then sees the actor die (``RayActorError``),
settles the job the way it does for a lost replica, and starts a fresh one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import threading
import types
from collections.abc import Callable, Iterator

from ...remote.framing import frame
from ..config import ServerConfig
from .channel import ChannelClosed, WorkerStartError
from .local import LocalProcess

__all__ = ["WorkerRelay", "worker_config"]

_RECEIVE_WAIT = 1.0  # seconds; only how often the pump looks whether the worker still lives


def worker_config(config: ServerConfig, model: str) -> ServerConfig:
    """The server's settings as a replica's worker needs them: its one model, and no database URL
    (a Ray replica may run on another machine; it never talks to the job store)."""
    settings = {model: config.model_settings[model]} if model in config.model_settings else {}
    return dataclasses.replace(config, db_url="", models={model: config.models[model]},
                               model_settings=settings, replicas={}, replica_resources={}, memory_budget=0)


class WorkerRelay:
    """See the module docstring."""

    def __init__(self, config: ServerConfig, put: Callable[[bytes], None]) -> None:
        self.process = LocalProcess(config, _say, models=list(config.models))
        self.put = put

    def start(self) -> dict:
        try:
            with _plain_main():
                ready = self.process.start(threading.Event())
        except WorkerStartError as err:
            return {"op": "failed", "error": str(err)}
        threading.Thread(target=self._pump, name="glassbox-relay", daemon=True).start()
        return ready

    def send(self, message: dict, blob: bytes) -> None:
        try:
            self.process.send(message, blob)
        except ChannelClosed:
            _end_replica()

    def _pump(self) -> None:
        while True:
            try:
                received = self.process.receive(_RECEIVE_WAIT)
            except ChannelClosed:
                _end_replica()
            if received is not None:
                self.put(frame(*received))


def _say(line: str) -> None:
    print(f"[glassbox replica] {line}", file=sys.stderr, flush=True)


def _end_replica() -> None:
    """The worker is gone: so is this replica, so that the feeder sees it and starts a new one."""
    _say("its worker process ended; the replica ends with it")
    os._exit(1)


@contextlib.contextmanager
def _plain_main() -> Iterator[None]:
    """While the worker is spawned: no ``__main__`` for it to import. ``multiprocessing``'s spawn
    re-runs the parent's main script in the child, which in a Ray actor is Ray's own worker script
    (it would import Ray, and its threads, into a process that must stay single-threaded)."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main
