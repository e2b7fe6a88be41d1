"""Live job events (status, printed output) fanned out to websocket listeners.

Offers:
    Hub(store)      .publish(job_id, event) from any thread; .subscribe / .unsubscribe / .live_logs
                    / .note (what the server does for a job now, e.g. "loading smollm2"; the
                    store holds it too, for the other API processes: workers/cold_load.py)

A final event from a feeder of this process carries the result as stored (bytes, under
``feeder.RESULT``): ``publish`` hands it to the listeners with the event (never keeps it), so a
websocket sends it without reading it back from the store.
"""

from __future__ import annotations

import asyncio
import threading
from collections import defaultdict

from ...remote.job import FINAL, Status
from ..store import JobInfo, JobStore
from ..workers.feeder import FINISHED, RESULT

__all__ = ["Hub"]


class Hub:
    """Live events of jobs for websocket listeners, safe to publish from any thread.

    Printed output of a running job lives here (the store gets it when the job ends), so a
    listener that subscribes late gets everything printed so far in its first event and then
    every later event, with neither gaps nor repeats: ``subscribe`` and ``publish`` take one lock.

        hub = Hub(store)
        queue, snapshot = hub.subscribe(job_id)       # in a thread; then `await queue.get()`
    """

    def __init__(self, store: JobStore) -> None:
        self.store = store
        self.loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._logs: dict[str, list[str]] = {}
        self._notes: dict[str, str] = {}  # the latest "note" of a running job, for late listeners
        self._listeners: dict[str, set[asyncio.Queue]] = defaultdict(set)

    def publish(self, job_id: str, event: dict) -> None:
        result = event.pop(RESULT, None)
        event.pop(FINISHED, None)  # for this process's metrics only
        with self._lock:
            if "log" in event:
                self._logs.setdefault(job_id, []).append(event["log"])
            if "note" in event:
                self._notes[job_id] = str(event["note"])
            if event.get("status") in FINAL or event.get("status") == Status.QUEUED:
                # Ended, or back in the queue (its process died, or the server stopped): nothing is
                # done for it, and a rerun prints everything again, as the store keeps only the
                # rerun's output (live logs of both runs read as one run's, printed twice).
                self._logs.pop(job_id, None)
                self._notes.pop(job_id, None)
            loop = self.loop
            if loop is None or loop.is_closed():
                return
            heard = event if result is None else {**event, RESULT: result}
            for queue in self._listeners.get(job_id, ()):
                loop.call_soon_threadsafe(queue.put_nowait, heard)

    def live_logs(self, job_id: str) -> str | None:
        with self._lock:
            chunks = self._logs.get(job_id)
            return "".join(chunks) if chunks is not None else None

    def note(self, job_id: str) -> str | None:
        with self._lock:
            return self._notes.get(job_id)

    def subscribe(self, job_id: str) -> tuple[asyncio.Queue, JobInfo | None, str]:
        """A queue of this job's future events, with its state and printed output right now."""
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            job = self.store.get(job_id)
            chunks = self._logs.get(job_id)
            logs = job.logs if job is None or job.terminal or chunks is None else "".join(chunks)
            self._listeners[job_id].add(queue)
        return queue, job, logs

    def unsubscribe(self, job_id: str, queue: asyncio.Queue) -> None:
        with self._lock:
            listeners = self._listeners.get(job_id)
            if listeners is not None:
                listeners.discard(queue)
                if not listeners:
                    del self._listeners[job_id]
