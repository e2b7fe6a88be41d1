"""The feeder: takes jobs from the store and runs them on one channel, one job or one batch at a time.

Offers:
    Feeder(config, store, on_event=None, say=None, channel=None, solo=None)
      .start(wait=True)      start the channel, wait until its models are loaded, start feeding it
      .wake()                a job was queued: look at the store now rather than at the next tick
      .cancel(job_id)        stop a running job (kills and restarts the channel); False if not running
      .stop()                end the feeder and the channel
      .state / .models / .error / .pid / .running / .restarts / .batches / .batched_jobs
    RESULT                   the key under which a final event (``on_event``) carries the job's
                             result as stored (bytes): api/hub.py hands it to listeners
    FINISHED                 the key under which a final event carries the store's ``Finished``
                             (the job's model and times): api/metrics.py reads it; never sent

What it does for any backend (``local.LocalProcess`` or ``ray_replicas.RayReplica``)::

    _feed (a thread):
      channel dead? ── start it again (backoff while it fails)
      _take: claim the next queued job it serves ─► _gather compatible ones (co-tenant batch,
             within batch_window_ms, up to max_batch) ─► one job or one batch
      _run:  its model cold? ─► _load it (cold_load.py: evicting per residency.py; the jobs'
             status says "loading NAME", in the store) ─► send ─► receive log / result messages
             until all are settled, or deadline passed / cancel / server stopping: kill the
             channel; a batch's jobs then
             run again alone (``solo``) so that only the one at fault fails
             channel died: the job runs again (crash_retries), else WorkerCrashed

The deadline counts from when the job (or batch) is sent. Killing is the only way to stop
arbitrary code, so cancel and timeout both kill; the queue is untouched (it is in the store).
"""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from ...remote.job import JobResult, Status
from ...remote.protocol import ProtocolError
from ..config import ServerConfig
from ..store import JobInfo, JobStore
from .channel import Channel, ChannelClosed, WorkerStartError
from .cold_load import ColdLoading
from .local import LocalProcess
from .output import bounded
from .residency import Residency

# The key under which a final event carries the job's result as the store now holds it (bytes):
# for this process's listeners (api/hub.py), never sent as it is.
RESULT = "result_frame"
# The key under which a final event carries what the store's finish() returned (``Finished``: the
# job's model and times), so metrics need not read the row again: for this process only.
FINISHED = "finished_row"

__all__ = ["FINISHED", "RESULT", "Feeder"]

_POLL = 0.05  # seconds between looks at the deadline / cancel flag while a job runs
_CANCEL_POLL = 0.5  # seconds between looks at the store for cancels asked through other API processes
_LOG_SLACK = 65536  # characters of printed output kept past max_log_bytes before any is dropped here
_ABORT_SECONDS = 10.0  # how long a forking worker may take to confirm it stopped a job


class Feeder(ColdLoading):
    """Feeds queued jobs from ``store`` to one channel (a local worker process by default, or one
    Ray replica), first come first served; compatible jobs for the same model are claimed together
    and run as one batch (co-tenant batching, see ``jobs/cotenant.py``).

        handle = Feeder(ServerConfig(models={"gpt2": path}), store, on_event=print)
        handle.start()                  # returns once the models are loaded
        handle.wake()                   # after store.mark_queued(job_id)

    Several handles may feed from one store (one per Ray replica): ``store.claim`` is atomic, so a
    job runs on exactly one of them. ``solo`` (shared by those handles) holds jobs that must run
    alone: the members of a batch that timed out or crashed, which then run one by one so that
    only the job at fault fails.
    """

    def __init__(
        self,
        config: ServerConfig,
        store: JobStore,
        *,
        on_event: Callable[[str, dict], None] | None = None,
        say: Callable[[str], None] | None = None,
        channel: Any = None,
        solo: set[str] | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.on_event = on_event or (lambda job_id, event: None)
        self.say = say or (lambda text: None)
        self.channel: Channel = channel if channel is not None else LocalProcess(config, self.say)
        self.solo = solo if solo is not None else set()
        self._together = False  # whether the last batch gathered had company (_gather)
        self.state = "stopped"  # stopped | starting | ready | restarting | failed
        self.models: dict[str, dict] = {}  # the loaded models, described
        self.residency = Residency(config)
        self.error: str | None = None
        self.running: list[str] = []
        self.restarts = 0
        self.batches = 0  # batches of more than one job run so far
        self.batched_jobs = 0  # the jobs those batches held
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._cancel: set[str] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._loaded_once = False

    @property
    def pid(self) -> int | None:
        return self.channel.pid

    @property
    def running_job(self) -> str | None:
        running = self.running
        return running[0] if running else None

    # ------------------------------------------------------------ control

    def start(self, wait: bool = True) -> None:
        """Start the worker and start feeding it. With ``wait``, return once the models are loaded
        (raising ``WorkerStartError`` if they cannot be); otherwise load in the background."""
        if self._thread is not None:
            return
        if wait:
            self._spawn()
        self._thread = threading.Thread(target=self._feed, name="glassbox-feeder", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def cancel(self, job_id: str) -> bool:
        """Ask the feeder to kill the job ``job_id`` if it is running here (it then becomes
        CANCELLED and the worker restarts). Returns whether it was running."""
        with self._lock:
            if job_id not in self.running:
                return False
            self._cancel.add(job_id)
        self._wake.set()
        return True

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self.channel.kill()
        self.state = "stopped"

    # ------------------------------------------------------------ process

    def _spawn(self) -> None:
        self.state = "starting"
        self.error = None
        try:
            ready = self.channel.start(self._stopping)
        except WorkerStartError as err:
            self.state = "failed"
            self.error = str(err)
            raise WorkerStartError(f"the worker could not load its models:\n{err}") from None
        self.models = dict(ready.get("models") or {})
        self.residency.loaded(self.models)
        if self._loaded_once:
            self.restarts += 1
        self._loaded_once = True
        self.state = "ready"
        self.say(f"{self.channel.label}: ready in {ready.get('seconds')} s ({ready.get('note', '')})")

    # ------------------------------------------------------------ feeding

    def _feed(self) -> None:
        backoff = 1.0
        while not self._stopping.is_set():
            try:
                if not self.channel.alive():
                    self.channel.kill()
                    try:
                        self._spawn()
                        backoff = 1.0
                    except WorkerStartError as err:
                        if self._stopping.is_set():
                            return
                        self.say(f"{err}\nretrying in {backoff:.0f} s")
                        self._stopping.wait(backoff)
                        backoff = min(backoff * 2, 60.0)
                        continue
                jobs, requests = self._take()
                if not jobs:
                    self._wake.wait(0.5)
                    self._wake.clear()
                    continue
                self._run(jobs, requests)
            except Exception:  # the feeder must survive anything (e.g. a database hiccup)
                self.say(f"feeder error (continuing):\n{traceback.format_exc()}")
                with self._lock:
                    self.running = []
                self._stopping.wait(0.5)

    def _claim(self, jobs: list[JobInfo], requests: dict[str, bytes]) -> list[JobInfo]:
        """Claim ``jobs`` in one statement; those claimed, their requests added to ``requests``."""
        ids = [job.id for job in jobs]
        # Known as running before the claim, so a cancel that sees RUNNING in the store
        # always finds them here.
        with self._lock:
            self.running = [*self.running, *ids]
        claimed = self.store.claim_many(ids)
        requests.update(claimed)
        with self._lock:
            self.running = [j for j in self.running if j not in ids or j in claimed]
        return [job for job in jobs if job.id in claimed]

    def _take(self) -> tuple[list[JobInfo], dict[str, bytes]]:
        """Claim the next queued job this channel serves and, when batching is on and it can
        share, compatible jobs queued now or within ``batch_window_ms``: one batch, and the
        requests its claims read."""
        # One look at the queue finds the next job and, for a first round of gathering, its company.
        queued = self.store.queued(self.channel.serves, limit=4 * max(1, self.config.max_batch))
        requests: dict[str, bytes] = {}
        if not queued or not self._claim(queued[:1], requests):
            return [], {}
        batch = [queued[0]]
        try:
            self._gather(batch, requests, queued[1:])
        except Exception:  # the claimed jobs must run whatever went wrong while gathering
            self.say(f"could not gather a batch (running {len(batch)} job(s)):\n{traceback.format_exc()}")
        return batch, requests

    def _gather(self, batch: list[JobInfo], requests: dict[str, bytes], seen: list[JobInfo]) -> None:
        """Add to ``batch`` (its first job claimed) the compatible jobs queued now (``seen``: the
        rest of the queue as ``_take`` just read it) or within the batch window."""
        job = batch[0]
        key = self._key(job)
        if key is None or self.config.max_batch <= 1:
            return
        deadline = time.monotonic() + self.config.batch_window_ms / 1000.0
        # Waiting for company only pays while jobs arrive together: a lone user's job, alone at an
        # idle worker, would only wait the whole window.
        together = self.config.batch_wait_always or self._together
        candidates: list[JobInfo] | None = [other for other in seen if other.model == job.model]
        try:
            while len(batch) < self.config.max_batch:
                found = False
                if candidates is None:
                    candidates = self.store.queued([job.model], limit=4 * self.config.max_batch)
                fitting = [other for other in candidates
                           if other.id not in requests and self._key(other) == key]
                room = self.config.max_batch - len(batch)
                joined = self._claim(fitting[:room], requests) if fitting else []
                if joined:
                    batch.extend(joined)
                    found = together = True
                candidates = None
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stopping.is_set() or not together:
                    break
                if not found:
                    self._wake.wait(min(remaining, 0.002))
                    self._wake.clear()
        finally:
            self._together = len(batch) > 1

    def _key(self, job: JobInfo) -> Any:
        """The job's batch key (None: it runs alone): decided when it was submitted
        (jobs/batchable.py), so nothing here reads the request again."""
        if job.id in self.solo or self.config.max_batch <= 1 or job.batch_key is None:
            return None
        if self.config.batch_scope == "key":
            return (job.batch_key, job.key_id)  # only jobs of one API key share a pass
        return job.batch_key

    def _run(self, jobs: list[JobInfo], claimed: dict[str, bytes]) -> None:
        ids = [job.id for job in jobs]
        attempts = {job.id: job.attempts + 1 for job in jobs}  # counted by the claim
        logs: dict[str, list[str]] = {job_id: [] for job_id in ids}
        logged = dict.fromkeys(ids, 0)  # characters of printed output so far (the next offset)
        pending = list(ids)
        try:
            requests = {}
            for job_id in ids:
                self.on_event(job_id, {"status": Status.RUNNING})
                request = claimed.get(job_id)
                if request is None:
                    lost = JobResult.failed("InternalError", "the request of this job was lost")
                    self._finish(job_id, lost, [])
                    pending.remove(job_id)
                else:
                    requests[job_id] = request
            if not pending:
                return
            model = jobs[0].model
            if not self.residency.is_ready(model) and not self._load(model, pending, attempts, logs):
                return
            self.residency.used(model)
            if len(pending) > 1:
                self.batches += 1
                self.batched_jobs += len(pending)
            try:
                self._send_jobs(pending, requests, shared=len(jobs) == 1 and jobs[0].batch_key is not None
                                and jobs[0].id not in self.solo)
            except ChannelClosed:
                self._crashed(pending, attempts, logs, batch=len(pending) > 1)
                return
            deadline = time.monotonic() + self.config.max_seconds
            # When to ask the store for cancel requests next (made through another API process:
            # this one's come through ``cancel``), not at once: a job's start waits for nothing.
            look_again = time.monotonic() + _CANCEL_POLL
            while pending:
                if self._stopping.is_set():
                    # Not the jobs' fault: they run again, from the start, when the server is back.
                    self._stop_running()
                    for job_id in pending:
                        self.store.requeue(job_id)
                    return
                if time.monotonic() >= look_again:
                    look_again = time.monotonic() + _CANCEL_POLL
                    try:
                        flagged = self.store.cancel_requests(pending)
                    except Exception:  # a database hiccup must not abandon the running job
                        flagged = []
                    with self._lock:
                        self._cancel.update(flagged)
                cancelled = [job_id for job_id in pending if job_id in self._cancel]
                if cancelled:
                    self._stop_running()
                    for job_id in pending:
                        if job_id in cancelled:
                            result = JobResult.failed("Cancelled", "the job was cancelled by its owner")
                            self._finish(job_id, result, logs[job_id], status=Status.CANCELLED)
                        else:
                            self._interrupted(job_id)
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._stop_running()
                    self._timed_out(pending, len(ids) > 1, logs)
                    return
                try:
                    received = self.channel.receive(min(remaining, _POLL))
                except ChannelClosed:
                    self._crashed(pending, attempts, logs, batch=len(ids) > 1)
                    return
                if received is None:
                    continue
                message, blob = received
                job_id = str(message.get("job"))
                if job_id not in pending:
                    continue  # left over from a job that was already settled
                if message.get("op") == "log":
                    text = str(message.get("text", ""))
                    if logged[job_id] > 2 * self.config.max_log_bytes + _LOG_SLACK:
                        continue  # a backstop: the worker caps printed output first (child.py)
                    offset, logged[job_id] = logged[job_id], logged[job_id] + len(text)
                    logs[job_id].append(text)
                    self.on_event(job_id, {"status": Status.RUNNING, "log": text, "offset": offset})
                elif message.get("op") == "crashed":  # its process died; the worker lives on
                    self._crashed(pending, attempts, logs, batch=len(ids) > 1, reason=message)
                    return
                elif message.get("op") == "result":
                    pending.remove(job_id)
                    self._completed(job_id, message.get("result"), blob, logs[job_id])
        finally:
            with self._lock:
                self.running = []
                self._cancel.difference_update(ids)

    def _drop_channel(self) -> None:
        """Kill the worker (the only way to stop arbitrary code); the feeder starts a new one."""
        self.channel.kill()
        self.state = "restarting"

    def _stop_running(self) -> None:
        """Stop the job or batch that is running: a channel that can (a forking worker) kills just
        the job's process and keeps its models, so a cancel or a time-out stalls nobody else;
        otherwise, or if it does not confirm in time, the whole worker goes."""
        if not getattr(self.channel, "can_abort", False):
            self._drop_channel()
            return
        try:
            self.channel.send({"op": "abort"})
            deadline = time.monotonic() + _ABORT_SECONDS
            while time.monotonic() < deadline:
                received = self.channel.receive(_POLL)
                if received is not None and received[0].get("op") == "aborted":
                    return
        except ChannelClosed:
            pass
        self._drop_channel()

    def _send_jobs(self, ids: list[str], requests: dict[str, bytes], shared: bool = False) -> None:
        """``shared``: a lone job that could have shared a pass (it has a batch key): a worker that
        runs passes split runs it as a pass of one (``workers/split.py``)."""
        limits = {**self.config.limits(), "max_log_bytes": self.config.max_log_bytes}
        if len(ids) == 1:
            self.channel.send({"op": "job", "job": ids[0], "limits": limits, "shared": shared},
                              requests[ids[0]])
            return
        sizes = [len(requests[job_id]) for job_id in ids]
        self.channel.send({"op": "batch", "jobs": ids, "sizes": sizes, "limits": limits},
                          b"".join(requests[job_id] for job_id in ids))

    def _interrupted(self, job_id: str, *, alone: bool = False) -> None:
        """Back to the head of the queue through no fault of its own (a batch it shared failed)."""
        if alone:
            self.solo.add(job_id)
        if self.store.requeue(job_id):
            self.on_event(job_id, {"status": Status.QUEUED, "position": 0})

    def _timed_out(self, pending: list[str], batch: bool, logs: dict[str, list[str]]) -> None:
        if batch:
            # Which of them ran too long is unknown: each runs again alone, so only that one fails.
            self.say(f"a batch of {len(pending)} jobs exceeded the time limit; running each alone")
            for job_id in pending:
                self._interrupted(job_id, alone=True)
            return
        limit = f"{self.config.max_seconds:g}"
        self._finish(pending[0], JobResult.failed(
            "TimeoutError",
            f"the job exceeded the time limit of {limit} s and was stopped (the server's max_seconds)"),
            logs[pending[0]])

    def _crashed(self, pending: list[str], attempts: dict[str, int], logs: dict[str, list[str]], *,
                 batch: bool = False, reason: dict | None = None) -> None:
        """The process running ``pending`` died: the worker itself (``reason`` None: restart it), or
        only the job's own forked process (``reason``: the worker's ``crashed`` message)."""
        label = self.channel.label
        lineno = None
        if reason is None:
            why, restarted = self.channel.exit_reason(), " The worker was restarted."
            self._drop_channel()
        else:
            why, restarted = str(reason.get("reason") or "unknown"), ""
            lineno = reason.get("lineno") if isinstance(reason.get("lineno"), int) else None
            label += " (the job's own process)"
        if batch:
            self.say(f"{label} died while running a batch of {len(pending)} jobs ({why}); "
                     "running each alone")
            for job_id in pending:
                self._interrupted(job_id, alone=True)
            return
        for job_id in pending:
            if attempts.get(job_id, 1) <= self.config.crash_retries:
                self.say(f"{label} died while running job {job_id} ({why}); it runs once more")
                self.solo.add(job_id)
                if self.store.retry(job_id):
                    self.on_event(job_id, {"status": Status.QUEUED, "position": 0})
                continue
            hint = "" if reason else "; the job may need more memory than the server has"
            result = JobResult.failed("WorkerCrashed", (
                f"the process running this job died ({why}), {attempts.get(job_id, 1)} time(s){hint}."
                f"{restarted}"), lineno=lineno)
            self._finish(job_id, result, logs[job_id])

    def _completed(self, job_id: str, envelope: Any, blob: bytes, logs: list[str]) -> None:
        try:
            result = JobResult.from_envelope(envelope, blob)
        except (ProtocolError, TypeError, ValueError):
            result = JobResult.failed("InternalError", "the worker sent a malformed result")
        self._finish(job_id, result, logs)

    def _finish(self, job_id: str, result: JobResult, logs: list[str], *,
                status: Status | None = None) -> None:
        """Store a job's end: its error, printed output and result within the per-job limits
        (output.py), and within its key's quota (checked by the store as it writes)."""
        self.solo.discard(job_id)
        output = bounded(result, logs, self.config, status)
        finished = self.store.finish(job_id, output.status, result=output.result, error=output.error,
                                     logs=output.logs, max_stored_bytes=self.config.max_stored_bytes_per_key)
        if finished:
            event: dict[str, Any] = {"status": finished.status}
            if finished.error:
                event["error"] = finished.error
            if finished.kept and output.result is not None:
                event[RESULT] = output.result  # what the store now holds: listeners here send it as is
            event[FINISHED] = finished
            self.on_event(job_id, event)
