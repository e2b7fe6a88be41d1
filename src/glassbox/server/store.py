"""The durable job store: jobs (and, through its bases, API keys and server instances) in SQLite
(default) or any SQLAlchemy 2 database.

Offers:
    JobStore(url, instance=None)      open (and create) the database; ``instance`` names this server
                                      process (instances.py), a new random id by default
      (keys.py)  .create_key(name, operator=False) / .list_keys() / .revoke_key(..) / .authenticate(key)
      (instances.py)  .begin_life() / .heartbeat() / .leave() / .instances()
      (tallies.py)  .tallies() -> Tallies   counts over every job, for the metrics endpoint
      .create_job(key_id, model, request, batch_key=None, max_active=0, max_stored_bytes=0,
                  queued=False) -> job id
                                      (RECEIVED; ``request``: the framed bytes as received)
      .queue_job(key_id, model, request, batch_key=None, max_active=0, max_stored_bytes=0)
                  -> (job id, position)  stored as QUEUED, and its place in the queue, in one
                                      transaction (what the API's admission needs)
      .mark_queued(id) / .claim(id) / .claim_many(ids) / .requeue(id) / .retry(id)
      .finish(id, status, result=, error=, logs=, max_stored_bytes=0) -> Finished | None
                                      final: what it keeps (the quota may refuse the job's output)
      .cancel(id) / .cancel_requests(ids)   cancel a job that waits; flag one that runs
      .get(id) -> JobInfo | None / .request(id) / .result(id) / .replace_result(id, note) -> freed
      .queued() -> [JobInfo] in FIFO order / .next_queued() / .position(id) / .active_count(key_id)
      .set_note(id, note)             what the server does for a job it runs now ("loading gpt2"):
                                      part of its status for every API process; cleared when the
                                      job finishes or goes back to the queue
      .ahead_of(id) -> {model: n} | None   the queued jobs before this one, counted by model
      .recent_durations(models) -> {model: [seconds]}   with ahead_of: the queue-wait estimate's
                                      inputs (api/queue_wait.py)
      .stored_bytes(key_id) -> bytes the key's jobs make the server keep (results, errors, printed
                                      output: what its quota counts) until they expire
      .jobs_of(key_id) / .recent_jobs(statuses=None, limit=50) / .result_sizes(ids)
      .recover() -> {what: count}       run once at startup: this instance begins a new life, and
                                        the jobs dead instances (its previous life too) left are settled
      .requeue_orphans() -> {what: count}   the same settling, run every few seconds (Heartbeat)
      .delete_expired(ttl_seconds) -> n
    JobInfo                           a plain snapshot (no live database rows leak out; job_rows.py)
    KeyInfo, hash_key                 from keys.py
    TooManyJobs                       create_job refused: the key is at its max_active
    OverQuota                         create_job refused: the key's stored results are at its quota
    Finished                          what finish kept: status, error, kept (False: over the quota)
    output_bytes(result, error, logs) the bytes a finished job makes the store keep (its quota share)
    STORED_BYTES                      the same, as SQL over the jobs table (sum() it per key)
    MAX_ATTEMPTS                      (a job's statuses: glassbox.remote.job.Status / FINAL)

    store = JobStore("sqlite:///tmp/glassbox.db")
    job = store.create_job("k1", "gpt2", b"...")

Job lifecycle and durability (decisions):
    RECEIVED  the request is stored (create_job); the API process validates and then
    QUEUED    queues it (mark_queued) and answers the client with the id
    RUNNING   a worker took it (claim: an atomic QUEUED -> RUNNING, attempts += 1)
    COMPLETED / ERROR / CANCELLED   final; the request blob is dropped, the result kept
              ``result_ttl_seconds`` after ``finished``, then deleted (delete_expired)

    ``held_by`` records the instance that holds a RECEIVED job (received it) or a RUNNING one
    (claimed it); ``requeue``, ``retry`` and finishing a RUNNING job are refused to any other
    instance, so a server wrongly presumed dead cannot undo what another one did since.

    A held job is an orphan when its holder stopped (cleanly, or silent for ``instance_timeout()``
    seconds: killed, crashed, cut off) or began a new life since it took the job. Orphans are
    settled at startup (``recover``) and every few seconds (``requeue_orphans``) by every server:
    - RUNNING orphans were interrupted by their server dying, not necessarily by the job: they go
      back to the head of the queue, once. A job that was already run ``MAX_ATTEMPTS`` times fails
      instead ("the server stopped while running this job N times"), so a job that itself kills
      servers cannot put them in a crash loop; one whose owner asked to cancel it is CANCELLED.
      (A worker crash while the server lives is blamed on the job at once: see feeder.py.)
    - RECEIVED orphans never got their id back to the client (the server died before answering),
      so nobody can fetch them: they fail rather than run unrequested.
    - QUEUED jobs belong to no server: they stay queued, in their original order.
    Jobs that live servers hold are never touched, so servers may start and stop at any time.

The stored-bytes quota (``max_stored_bytes``) counts every byte a key's jobs make the server keep:
each finished job's framed result, its error (as stored, JSON) and its printed output (UTF-8),
recorded once in ``output_bytes`` when it finishes. ``create_job`` refuses a key at or over it;
``finish`` checks again when the output is stored, in the same transaction as the write, so a key
with many jobs in flight cannot store many times its quota: an output that would bring the key
over it is not kept, and the job ends ERROR with a ``QuotaExceeded`` error that gives the numbers.

PostgreSQL (``postgresql+psycopg://user@host/db``) lets several API processes share one
database: ``claim`` is one conditional UPDATE (``... WHERE status = 'QUEUED'``) whose row count
says who won, which stays right under READ COMMITTED with claimers in other processes; settling
an orphan is one conditional UPDATE too (``... AND started = <as seen>``); ``create_job`` takes a
per-key advisory lock so that ``max_active`` and the quota hold across processes; ``finish`` takes
the same lock before it counts the key's stored bytes and writes the job's output. Timestamps are
seconds since the epoch (UTC), as floats. The engine and transactions: database.py.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import time
from typing import Any

from sqlalchemy import and_, delete, func, insert, or_, select, update
from sqlalchemy.engine import Connection

from ..remote.job import FINAL, Status
from .instances import InstanceStore, _Instance, instance_timeout, new_instance_id
from .job_rows import (
    INFO_COLUMNS,
    STORED_BYTES,
    Finished,
    JobInfo,
    _Job,
    error_text,
    info_from_columns,
    output_bytes,
)
from .keys import KeyInfo, KeyStore, hash_key
from .tallies import TallyStore

__all__ = [
    "MAX_ATTEMPTS",
    "STORED_BYTES",
    "Finished",
    "JobInfo",
    "JobStore",
    "KeyInfo",
    "OverQuota",
    "TooManyJobs",
    "hash_key",
    "output_bytes",
]

ACTIVE = (Status.RECEIVED, Status.QUEUED, Status.RUNNING)
MAX_ATTEMPTS = 2


class TooManyJobs(Exception):
    """The key already has ``max_active`` jobs received, queued or running."""

    def __init__(self, active: int, limit: int) -> None:
        super().__init__(f"{active} jobs active, limit {limit}")
        self.active = active
        self.limit = limit


class OverQuota(Exception):
    """What the key's jobs hold in the store (results, errors, output) is at or over ``max_stored_bytes``."""

    def __init__(self, stored: int, limit: int) -> None:
        super().__init__(f"{stored} bytes of results stored, quota {limit}")
        self.stored = stored
        self.limit = limit


class JobStore(KeyStore, InstanceStore, TallyStore):
    """Jobs, API keys and server instances, in the database at ``url`` (created if missing).

        store = JobStore("sqlite://")            # in memory, for tests
        job = store.create_job("k1", "gpt2", b"...")
        store.mark_queued(job)
        assert store.next_queued().id == job
    """

    def __init__(self, url: str, *, instance: str | None = None) -> None:
        super().__init__(url)
        self.instance = instance or new_instance_id()

    def _mine(self) -> Any:
        """A job this instance runs: only it may requeue it or finish it (see the module docstring)."""
        return and_(_Job.status == Status.RUNNING, _Job.held_by == self.instance)

    # ------------------------------------------------------------ jobs

    def create_job(self, key_id: str, model: str, request: bytes, *, batch_key: str | None = None,
                   max_active: int = 0, max_stored_bytes: int = 0, queued: bool = False) -> str:
        """Store a request as RECEIVED (``queued``: as QUEUED, for a request validated already: one
        transaction, not two) and return its new id. With ``max_active``, refuse
        (``TooManyJobs``) when the key already has that many jobs received, queued or running;
        with ``max_stored_bytes``, refuse (``OverQuota``) when the results its jobs hold are at or
        over that many bytes. The counts and the insert are one transaction."""
        with self._session() as session:
            return self._insert_job(session, key_id, model, request, batch_key=batch_key,
                                    max_active=max_active, max_stored_bytes=max_stored_bytes, queued=queued)

    def queue_job(self, key_id: str, model: str, request: bytes, *, batch_key: str | None = None,
                  max_active: int = 0, max_stored_bytes: int = 0) -> tuple[str, int]:
        """``create_job(queued=True)`` and how many queued jobs run before it, in one transaction
        (a separate ``position`` is one more transaction on every job's admission)."""
        with self._session() as session:
            job_id = self._insert_job(session, key_id, model, request, batch_key=batch_key,
                                      max_active=max_active, max_stored_bytes=max_stored_bytes, queued=True)
            seq = select(_Job.seq).where(_Job.id == job_id).scalar_subquery()
            ahead = session.scalar(select(func.count()).select_from(_Job).where(
                _Job.status == Status.QUEUED, _Job.seq < seq))
            return job_id, int(ahead or 0)

    def _insert_job(self, session: Connection, key_id: str, model: str, request: bytes, *,
                    batch_key: str | None, max_active: int, max_stored_bytes: int, queued: bool) -> str:
        now = time.time()
        job_id = secrets.token_urlsafe(16)
        while job_id.startswith("-"):  # a command line would take it for an option (glassbox jobs)
            job_id = secrets.token_urlsafe(16)
        if max_active or max_stored_bytes:
            self._advisory_lock(session, f"glassbox-key:{key_id}")
        if max_active:
            active = session.scalar(select(func.count()).select_from(_Job).where(
                _Job.key_id == key_id, _Job.status.in_(ACTIVE))) or 0
            if active >= max_active:
                raise TooManyJobs(active, max_active)
        if max_stored_bytes:
            stored = _stored_bytes(session, key_id)
            if stored >= max_stored_bytes:
                raise OverQuota(stored, max_stored_bytes)
        status = Status.QUEUED if queued else Status.RECEIVED
        session.execute(insert(_Job).values(
            id=job_id, key_id=key_id, model=model, status=status, created=now, updated=now, attempts=0,
            request=bytes(request), logs="", held_by=self.instance, batch_key=batch_key))
        return job_id

    def mark_queued(self, job_id: str) -> bool:
        return self._transition(job_id, (Status.RECEIVED,), status=Status.QUEUED)

    def claim(self, job_id: str) -> bytes | None:
        """QUEUED -> RUNNING, atomically; returns the request the job runs (read in the same
        statement), or None if someone else took or cancelled it first."""
        return self.claim_many([job_id]).get(job_id)

    def claim_many(self, job_ids: list[str]) -> dict[str, bytes]:
        """``claim`` for several jobs in one statement (a co-tenant batch): the requests of those
        that were still queued, by id; the others were taken or cancelled first."""
        if not job_ids:
            return {}
        now = time.time()
        with self._session(durable=False) as session:  # undone by a power cut: QUEUED again
            rows = session.execute(
                update(_Job).where(_Job.id.in_(list(job_ids)), _Job.status == Status.QUEUED)
                .values(status=Status.RUNNING, started=now, updated=now, attempts=_Job.attempts + 1,
                        held_by=self.instance, note=None)
                .returning(_Job.id, _Job.request)
            )
            return {row.id: row.request for row in rows}

    def requeue(self, job_id: str) -> bool:
        """RUNNING (here) -> QUEUED (keeping its place at the head of the queue) for a job this
        server interrupted itself, e.g. on shutdown; the attempt does not count against the job."""
        return self._change(job_id, self._mine(), status=Status.QUEUED, started=None, logs="", note=None,
                            attempts=_Job.attempts - 1)

    def retry(self, job_id: str) -> bool:
        """RUNNING (here) -> QUEUED at the head of the queue for a job whose worker died under it:
        unlike ``requeue`` the attempt counts (the feeder decides from ``attempts`` whether to retry)."""
        return self._change(job_id, self._mine(), status=Status.QUEUED, started=None, logs="", note=None)

    def set_note(self, job_id: str, note: str | None) -> bool:
        """Say what the server does for a job it runs here now (``None``: nothing to say); False
        if the job is not running here (it ended, or another server runs it)."""
        if note is not None and len(note) > 500:
            note = note[:499] + "\N{HORIZONTAL ELLIPSIS}"
        return self._change(job_id, self._mine(), note=note)

    def finish(self, job_id: str, status: str, *, result: bytes | None = None, error: dict | None = None,
               logs: str | None = None, max_stored_bytes: int = 0) -> Finished | None:
        """Move a job that waits, or that runs here, to a final ``status``; None if it already was
        final (a cancel and a completion raced: the first one wins) or runs elsewhere. With
        ``max_stored_bytes``, the key's stored bytes are counted in the same transaction (under the
        key's lock, as in ``create_job``): an output that would bring them over it is not kept, and
        the job ends ERROR (CANCELLED stays) with a QuotaExceeded error instead."""
        if status not in FINAL:
            raise ValueError(f"finish() takes a final status {sorted(FINAL)}, got {status!r}")
        now = time.time()
        if logs is not None:
            # PostgreSQL text cannot hold NUL, which a job may print: on every database it reads
            # back as U+FFFD (one character for one, so log offsets stay right).
            logs = logs.replace("\x00", "\N{REPLACEMENT CHARACTER}")
        outcome = Finished(Status(status), error)
        # Not durable: a power cut may undo it; the job is then RUNNING, and recovery runs it again.
        with self._session(durable=False) as session:
            if max_stored_bytes:
                key_id = session.scalar(select(_Job.key_id).where(_Job.id == job_id))
                self._advisory_lock(session, f"glassbox-key:{key_id}")
                size = output_bytes(result, error, logs)
                used = _stored_bytes(session, key_id, besides=job_id)
                if used + size > max_stored_bytes:
                    error = _over_quota(size, used, max_stored_bytes)
                    status = Status.CANCELLED if status == Status.CANCELLED else Status.ERROR
                    result, logs = None, ""
                    outcome = Finished(Status(status), error, kept=False)
            values: dict[str, Any] = {
                "status": status, "finished": now, "updated": now, "request": None, "result": result,
                "error": error_text(error) if error else None, "note": None,
                "output_bytes": output_bytes(result, error, logs)}
            if logs is not None:
                values["logs"] = logs
            waiting = _Job.status.in_((Status.RECEIVED, Status.QUEUED))
            row = session.execute(update(_Job).where(_Job.id == job_id, or_(waiting, self._mine()))
                                  .values(**values)
                                  .returning(_Job.model, _Job.created, _Job.started, _Job.finished)).first()
            if row is None:
                return None
            return dataclasses.replace(outcome, model=row.model, created=row.created, started=row.started,
                                       finished=row.finished)

    def cancel(self, job_id: str, *, result: bytes | None = None) -> str | None:
        """Cancel a job that has not started (storing ``result`` as what its owner fetches), or
        flag a running one for the server that runs it (``cancel_requests``): returns its status
        afterwards (CANCELLED, RUNNING, or the final status it had), None if there is no such job."""
        now = time.time()
        with self._session() as session:
            session.execute(
                update(_Job).where(_Job.id == job_id, _Job.status.in_((Status.RECEIVED, Status.QUEUED)))
                .values(status=Status.CANCELLED, finished=now, updated=now, request=None, result=result,
                        output_bytes=output_bytes(result, None, None))
            )
            session.execute(update(_Job).where(_Job.id == job_id, _Job.status == Status.RUNNING)
                            .values(cancel_requested=now))
            return session.scalar(select(_Job.status).where(_Job.id == job_id))

    def cancel_requests(self, job_ids: list[str]) -> list[str]:
        """Those of these jobs whose owner asked (through any server) to cancel them while they run."""
        if not job_ids:
            return []
        with self._session() as session:
            return list(session.scalars(select(_Job.id).where(_Job.id.in_(list(job_ids)),
                                                              _Job.cancel_requested.is_not(None))))

    def _transition(self, job_id: str, before: tuple[str, ...], **values: Any) -> bool:
        return self._change(job_id, _Job.status.in_(before), **values)

    def _change(self, job_id: str, condition: Any, **values: Any) -> bool:
        values.setdefault("updated", time.time())
        with self._session() as session:
            done = session.execute(update(_Job).where(_Job.id == job_id, condition).values(**values))
            return done.rowcount == 1

    def get(self, job_id: str) -> JobInfo | None:
        if "\x00" in job_id:  # no id holds one, and PostgreSQL cannot even be asked (text has no NUL)
            return None
        with self._session() as session:
            row = session.execute(select(*INFO_COLUMNS).where(_Job.id == job_id)).first()
            return info_from_columns(row) if row is not None else None

    def request(self, job_id: str) -> bytes | None:
        with self._session() as session:
            return session.scalar(select(_Job.request).where(_Job.id == job_id))

    def result(self, job_id: str) -> bytes | None:
        with self._session() as session:
            return session.scalar(select(_Job.result).where(_Job.id == job_id))

    def replace_result(self, job_id: str, result: bytes) -> int:
        """Put ``result`` (small: a note that it was deleted) in place of a finished job's stored
        result, so that its owner's quota is freed at once; returns the bytes freed (0 if the job
        is not finished)."""
        with self._session() as session:
            row = session.execute(select(func.length(_Job.result).label("old"), STORED_BYTES.label("size"))
                                  .where(_Job.id == job_id, _Job.status.in_(tuple(FINAL)))).first()
            if row is None or row.old is None:
                return 0
            kept = max(0, int(row.size) - int(row.old) + len(result))
            session.execute(update(_Job).where(_Job.id == job_id).values(
                result=result, output_bytes=kept, updated=time.time()))
        return max(0, int(row.old) - len(result))

    def queued(self, models: list[str] | None = None, limit: int | None = None) -> list[JobInfo]:
        """QUEUED jobs (for ``models`` only, if given), first to run first; at most ``limit``."""
        query = select(*INFO_COLUMNS).where(_Job.status == Status.QUEUED)
        if models is not None:
            query = query.where(_Job.model.in_(list(models)))
        query = query.order_by(_Job.seq)
        if limit is not None:
            query = query.limit(limit)
        with self._session() as session:
            return [info_from_columns(row) for row in session.execute(query)]

    def next_queued(self, models: list[str] | None = None) -> JobInfo | None:
        """The job that runs next (of those for ``models``, if given)."""
        jobs = self.queued(models, limit=1)
        return jobs[0] if jobs else None

    def position(self, job_id: str) -> int | None:
        """How many queued jobs run before this one (0: it is next), None if it is not queued."""
        with self._session() as session:
            row = session.execute(select(_Job.seq, _Job.status).where(_Job.id == job_id)).first()
            if row is None or row.status != Status.QUEUED:
                return None
            return session.scalar(select(func.count()).select_from(_Job).where(
                _Job.status == Status.QUEUED, _Job.seq < row.seq)) or 0

    def ahead_of(self, job_id: str) -> dict[str, int] | None:
        """The queued jobs that run before this one, counted by model (no ids, no keys: what the
        queue-wait estimate may know of other tenants); None if it is not queued."""
        with self._session() as session:
            row = session.execute(select(_Job.seq, _Job.status).where(_Job.id == job_id)).first()
            if row is None or row.status != Status.QUEUED:
                return None
            counts = session.execute(select(_Job.model, func.count()).where(
                _Job.status == Status.QUEUED, _Job.seq < row.seq).group_by(_Job.model))
            return {model: int(count) for model, count in counts}

    def recent_durations(self, models: list[str], limit: int = 20) -> dict[str, list[float]]:
        """Run times (claim to end, a load included) of each model's newest ``limit`` COMPLETED
        jobs, newest first; a model with none is left out."""
        durations: dict[str, list[float]] = {}
        with self._session() as session:
            for model in sorted(set(models)):
                rows = session.execute(
                    select(_Job.started, _Job.finished)
                    .where(_Job.model == model, _Job.status == Status.COMPLETED, _Job.started.is_not(None),
                           _Job.finished.is_not(None))
                    .order_by(_Job.finished.desc()).limit(limit)).all()
                if rows:
                    durations[model] = [max(0.0, finished - started) for started, finished in rows]
        return durations

    def active_count(self, key_id: str) -> int:
        with self._session() as session:
            return session.scalar(select(func.count()).select_from(_Job).where(
                _Job.key_id == key_id, _Job.status.in_(ACTIVE))) or 0

    def stored_bytes(self, key_id: str) -> int:
        """Bytes the key's jobs make the server keep now (each one's framed result as its owner
        fetches it, its error and its printed output), kept until the job expires (``delete_expired``)."""
        with self._session() as session:
            return _stored_bytes(session, key_id)

    def jobs_of(self, key_id: str) -> list[JobInfo]:
        with self._session() as session:
            rows = session.execute(select(*INFO_COLUMNS).where(_Job.key_id == key_id).order_by(_Job.seq))
            return [info_from_columns(row) for row in rows]

    def recent_jobs(self, statuses: tuple[str, ...] | None = None, limit: int = 50) -> list[JobInfo]:
        """Every key's jobs (in ``statuses``, if given), newest first, at most ``limit``: the
        operator's dashboard."""
        query = select(*INFO_COLUMNS)
        if statuses is not None:
            query = query.where(_Job.status.in_(list(statuses)))
        with self._session() as session:
            return [info_from_columns(row) for row in session.execute(query.order_by(_Job.seq.desc())
                                                                       .limit(limit))]

    def result_sizes(self, job_ids: list[str]) -> dict[str, int]:
        """Bytes of the stored result of each of these jobs that has one (length() reads no blob)."""
        if not job_ids:
            return {}
        with self._session() as session:
            rows = session.execute(select(_Job.id, func.length(_Job.result))
                                   .where(_Job.id.in_(list(job_ids)), _Job.result.is_not(None)))
            return {job_id: int(size or 0) for job_id, size in rows}

    # ------------------------------------------------------------ housekeeping

    def recover(self, max_attempts: int = MAX_ATTEMPTS, timeout: float | None = None) -> dict[str, int]:
        """Run once at startup: this instance begins a new life (so what its previous one held is
        orphaned), then orphans are settled as ``requeue_orphans`` does. ``queued``: the jobs that
        were waiting already."""
        self.begin_life()
        with self._session() as session:
            queued = session.scalar(
                select(func.count()).select_from(_Job).where(_Job.status == Status.QUEUED))
        return {**self.requeue_orphans(max_attempts, timeout), "queued": queued or 0}

    def requeue_orphans(self, max_attempts: int = MAX_ATTEMPTS,
                        timeout: float | None = None) -> dict[str, int]:
        """Settle the jobs held by instances that are gone (see the module docstring); an instance
        is presumed dead after ``timeout`` seconds (default ``instance_timeout()``) without a heartbeat."""
        now = time.time()
        quiet_since = now - (instance_timeout() if timeout is None else timeout)
        counts = {"requeued": 0, "failed": 0, "dropped": 0, "cancelled": 0}
        with self._session() as session:
            held = session.execute(
                select(_Job.id, _Job.status, _Job.held_by, _Job.created, _Job.started, _Job.attempts,
                       _Job.cancel_requested, _Instance.started.label("life"), _Instance.heartbeat)
                .outerjoin(_Instance, _Instance.id == _Job.held_by)
                .where(_Job.status.in_((Status.RECEIVED, Status.RUNNING))).order_by(_Job.seq)
            ).all()
            for row in held:
                taken = row.started if row.status == Status.RUNNING else row.created
                if row.held_by is None or taken is None:
                    orphan = True  # held by a server from before instances were recorded
                elif row.heartbeat is None:  # its holder never beat (yet), or was forgotten
                    orphan = taken < quiet_since
                else:
                    orphan = row.life > taken or row.heartbeat < quiet_since
                if orphan:
                    outcome = self._settle(session, row, now, max_attempts)
                    if outcome:
                        counts[outcome] += 1
        return counts

    def _settle(self, session: Connection, row: Any, now: float, max_attempts: int) -> str | None:
        # Only the row as it was seen: if its holder (or anyone) changed it since, it is not an orphan.
        seen = [_Job.id == row.id, _Job.status == row.status]
        if row.status == Status.RUNNING:
            seen.append(_Job.started == row.started)
        final = {"finished": now, "request": None, "updated": now, "note": None}
        if row.status == Status.RECEIVED:
            outcome, values = "dropped", {**final, "status": Status.ERROR, "error": json.dumps({
                "type": "ServerRestarted",
                "message": "the server stopped before it could queue this job; submit it again"})}
        elif row.cancel_requested is not None:
            outcome, values = "cancelled", {**final, "status": Status.CANCELLED, "error": json.dumps({
                "type": "Cancelled", "message": "the job was cancelled by its owner"})}
        elif row.attempts < max_attempts:
            # The rerun prints everything again.
            outcome, values = "requeued", {"status": Status.QUEUED, "started": None, "logs": "",
                                           "updated": now, "note": None}
        else:
            outcome, values = "failed", {**final, "status": Status.ERROR, "error": json.dumps({
                "type": "ServerRestarted",
                "message": (f"the server stopped while running this job {row.attempts} times; it is not "
                            "run again in case the job itself is what stops the server")})}
        if "error" in values:
            values["output_bytes"] = len(values["error"])
        done = session.execute(update(_Job).where(*seen).values(**values))
        return outcome if done.rowcount == 1 else None

    def delete_expired(self, ttl_seconds: float, now: float | None = None) -> int:
        """Delete final jobs that finished more than ``ttl_seconds`` ago."""
        cutoff = (time.time() if now is None else now) - ttl_seconds
        with self._session() as session:
            done = session.execute(delete(_Job).where(_Job.status.in_(tuple(FINAL)), _Job.finished < cutoff))
            return done.rowcount


def _stored_bytes(session: Connection, key_id: str, besides: str | None = None) -> int:
    """Bytes the key's jobs make the store keep (``besides``: leaving that job out). Reads the
    recorded sizes and, for rows from before them, length() of a result (a BLOB's / bytea's size,
    read without loading it)."""
    # Final jobs from the index (key_id, output_bytes) alone: no row is read, so no result either.
    recorded = select(func.coalesce(func.sum(_Job.output_bytes), 0)).where(
        _Job.key_id == key_id, _Job.output_bytes.is_not(None))
    older = select(func.coalesce(func.sum(STORED_BYTES), 0)).where(
        _Job.key_id == key_id, _Job.output_bytes.is_(None))  # jobs not final yet, and old rows
    total = int(session.scalar(recorded) or 0)
    if besides is not None:
        older = older.where(_Job.id != besides)
        left_out = select(func.coalesce(_Job.output_bytes, 0)).where(_Job.id == besides)
        total -= int(session.scalar(left_out) or 0)
    return total + int(session.scalar(older) or 0)


def _over_quota(size: int, used: int, quota: int) -> dict:
    return {"type": "QuotaExceeded", "lineno": None, "line": None, "message": (
        f"the job ran, but its output was not kept: its result, error and printed output are "
        f"{size:,} bytes, and this API key's finished jobs already hold {used:,} bytes on this "
        f"server, {used + size:,} together, over the key's quota of {quota:,} bytes "
        "(max_stored_bytes_per_key, --max-stored-bytes-per-key). Fetch the results you need and "
        "delete them (DELETE /v1/jobs/ID/result) or let them expire, then run the job again; or "
        "ask the operator for a larger quota")}
