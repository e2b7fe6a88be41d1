"""Loading a cold model for the jobs that need it, and saying so in their status (a part of the
feeder, kept in a file of its own).

Offers:
    ColdLoading     the feeder's (``feeder.Feeder``'s) base: ``_load(model, pending, attempts, logs)``
                    and ``_note(ids, note)``

While a job's model loads, the job is RUNNING and its ``note`` says why it has not started
(``loading smollm2 (evicting tiny)``, then ``smollm2 loaded in 2.1 s``). The note goes to the
store (``JobStore.set_note``: every API process sharing the database answers ``GET /v1/jobs/{id}``
with it, whichever one runs the job) and out as a websocket event; the store clears it when the
job ends or goes back to the queue.
"""

from __future__ import annotations

import time
import traceback
from typing import Any

from ...remote.job import JobResult, Status
from .channel import ChannelClosed
from .residency import NoRoom

__all__ = ["ColdLoading"]

_POLL = 0.05  # seconds between looks at the channel while a model loads


class ColdLoading:
    """What ``Feeder`` does when a job's model is not loaded. It uses the feeder's ``config``,
    ``store``, ``channel``, ``residency``, ``models``, ``say``, ``on_event``, ``_stopping`` and its
    ``_finish`` / ``_crashed`` / ``_drop_channel`` (see feeder.py)."""

    config: Any
    store: Any
    channel: Any
    residency: Any
    models: dict[str, dict]
    say: Any
    on_event: Any
    _stopping: Any

    def _note(self, ids: list[str], note: str) -> None:
        """Say what is done for these running jobs now: in their stored status and as an event."""
        for job_id in ids:
            try:
                self.store.set_note(job_id, note)
            except Exception:  # only a note: a database hiccup must not abandon the jobs
                self.say(f"could not store the note of job {job_id}:\n{traceback.format_exc()}")
            self.on_event(job_id, {"status": Status.RUNNING, "note": note})

    def _load(self, model: str, pending: list[str], attempts: dict[str, int],
              logs: dict[str, list[str]]) -> bool:
        """Load the cold ``model`` for the claimed jobs ``pending``, evicting as residency.py says.
        False if it cannot be loaded: then the jobs have ended with the reason."""
        try:
            evict = self.residency.to_evict(model)
        except (NoRoom, ValueError) as err:
            for job_id in pending:
                kind = "MemoryError" if isinstance(err, NoRoom) else "ModelError"
                self._finish(job_id, JobResult.failed(kind, str(err)), logs[job_id])
            return False
        note = f"loading {model}" + (f" (evicting {', '.join(evict)})" if evict else "")
        self.say(f"{self.channel.label}: {note}")
        self._note(pending, note)
        self.residency.loading(model)
        for name in evict:
            self.residency.evicted(name)
            self.models.pop(name, None)
        spec = self.config.worker_specs([model])[model]
        deadline = time.monotonic() + self.config.worker_start_timeout
        try:
            self.channel.send({"op": "load", "model": model, "spec": spec, "evict": evict})
            while True:
                if self._stopping.is_set() or time.monotonic() > deadline:
                    raise ChannelClosed("stopping" if self._stopping.is_set() else "load timed out")
                received = self.channel.receive(_POLL)
                if received is not None and received[0].get("op") in ("loaded", "load_failed"):
                    reply = received[0]
                    break
        except ChannelClosed as err:
            # The worker died or stuck while loading (killed for memory, say): it restarts with its
            # eager models; the jobs run again up to crash_retries times, as after any crash.
            self.residency.failed(model)
            self.say(f"loading {model} failed ({err}); the worker restarts")
            if self._stopping.is_set():
                self._drop_channel()
                for job_id in pending:
                    self.store.requeue(job_id)
            else:
                self._crashed(pending, attempts, logs, batch=len(pending) > 1)
            return False
        if reply.get("op") == "load_failed":
            self.residency.failed(model)
            self.say(f"could not load model {model!r}: {reply.get('error')}")
            # Not the error itself: it names the server's folders. Its kind, and where to look.
            kind = str(reply.get("error") or "").partition(":")[0] or "an error"
            message = (f"the server could not load model {model!r} ({kind}); the operator's log has the "
                       "details. Try again later or ask the operator.")
            for job_id in pending:
                self._finish(job_id, JobResult.failed("ModelError", message), logs[job_id])
            return False
        self.models[model] = dict(reply.get("info") or {})
        self.residency.ready(model)
        self.say(f"{self.channel.label}: {model} ready in {reply.get('seconds')} s")
        seconds = reply.get("seconds")
        took = f" in {float(seconds):.1f} s" if isinstance(seconds, (int, float)) else ""
        self._note(pending, f"{model} loaded{took}")
        return True

    # Provided by Feeder.
    def _finish(self, job_id: str, result: JobResult, logs: list[str], *,
                status: Status | None = None) -> None:
        raise NotImplementedError

    def _crashed(self, pending: list[str], attempts: dict[str, int], logs: dict[str, list[str]], *,
                 batch: bool = False, reason: dict | None = None) -> None:
        raise NotImplementedError

    def _drop_channel(self) -> None:
        raise NotImplementedError
