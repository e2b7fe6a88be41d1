"""The durable job store: jobs (and, through its bases, API keys and server instances) in SQLite
(default) or any SQLAlchemy 2 database.

Offers:
    JobStore(url, instance=None)      open (and create) the database; ``instance`` names this server
                                      process (instances.py), a new random id by default
      (keys.py)  .create_key(name, operator=False) / .list_keys() / .revoke_key(..) / .authenticate(key)
      (instances.py)  .begin_life() / .heartbeat() / .leave() / .instances()
      .create_job(key_id, model, request, batch_key=None, max_active=0, max_stored_bytes=0) -> job id
                                      (RECEIVED; ``request``: the framed bytes as received)
      .mark_queued(id) / .claim(id) / .requeue(id) / .retry(id) / .finish(id, status, ...)
      .cancel(id) / .cancel_requests(ids)   cancel a job that waits; flag one that runs
      .get(id) -> JobInfo | None / .request(id) / .result(id) / .replace_result(id, note) -> freed
      .queued() -> [JobInfo] in FIFO order / .next_queued() / .position(id) / .active_count(key_id)
      .set_note(id, note)             what the server does for a job it runs now ("loading gpt2"):
                                      part of its status for every API process; cleared when the
                                      job finishes or goes back to the queue
      .ahead_of(id) -> {model: n} | None   the queued jobs before this one, counted by model
      .recent_durations(models) -> {model: [seconds]}   with ahead_of: the queue-wait estimate's
                                      inputs (api/queue_wait.py)
      .stored_bytes(key_id) -> bytes of results the key's jobs hold (until they expire)
      .jobs_of(key_id) / .recent_jobs(statuses=None, limit=50) / .result_sizes(ids)
      .recover() -> {what: count}       run once at startup: this instance begins a new life, and
                                        the jobs dead instances (its previous life too) left are settled
      .requeue_orphans() -> {what: count}   the same settling, run every few seconds (Heartbeat)
      .delete_expired(ttl_seconds) -> n
    JobInfo                           a plain snapshot (no live database rows leak out)
    KeyInfo, hash_key                 from keys.py
    TooManyJobs                       create_job refused: the key is at its max_active
    OverQuota                         create_job refused: the key's stored results are at its quota
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

PostgreSQL (``postgresql+psycopg://user@host/db``) lets several API processes share one
database: ``claim`` is one conditional UPDATE (``... WHERE status = 'QUEUED'``) whose row count
says who won, which stays right under READ COMMITTED with claimers in other processes; settling
an orphan is one conditional UPDATE too (``... AND started = <as seen>``); ``create_job`` takes a
per-key advisory lock so that ``max_active`` and the quota hold across processes. Timestamps are
seconds since the epoch (UTC), as floats. The engine and transactions: database.py.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Float,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    and_,
    delete,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.orm import Mapped, Session, mapped_column

from ..remote.job import FINAL, Status
from .database import TableBase
from .instances import InstanceStore, _Instance, instance_timeout, new_instance_id
from .keys import KeyInfo, KeyStore, hash_key

__all__ = [
    "MAX_ATTEMPTS",
    "JobInfo",
    "JobStore",
    "KeyInfo",
    "OverQuota",
    "TooManyJobs",
    "hash_key",
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
    """The results the key's jobs hold in the store are at or over ``max_stored_bytes``."""

    def __init__(self, stored: int, limit: int) -> None:
        super().__init__(f"{stored} bytes of results stored, quota {limit}")
        self.stored = stored
        self.limit = limit


class _Job(TableBase):
    __tablename__ = "jobs"

    # seq orders the queue (FIFO); the public id is random so ids cannot be guessed or counted.
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    key_id: Mapped[str] = mapped_column(String(32), index=True)
    model: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16))
    created: Mapped[float] = mapped_column(Float)
    updated: Mapped[float] = mapped_column(Float)
    started: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished: Mapped[float | None] = mapped_column(Float, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    request: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    result: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    logs: Mapped[str] = mapped_column(Text, default="")
    held_by: Mapped[str | None] = mapped_column(String(64), nullable=True)  # an instance (see above)
    cancel_requested: Mapped[float | None] = mapped_column(Float, nullable=True)  # when, while RUNNING
    # jobs/batchable.py's key, decided once at submit (None: runs alone)
    batch_key: Mapped[str | None] = mapped_column(String(256), nullable=True)
    # What the server does for the job now ("loading gpt2"), while RUNNING: in the store, not in
    # one process's memory, because the API process asked may not be the one running the job.
    note: Mapped[str | None] = mapped_column(String(500), nullable=True)

    __table_args__ = (Index("ix_jobs_status_seq", "status", "seq"), Index("ix_jobs_finished", "finished"))


@dataclass(frozen=True)
class JobInfo:
    id: str
    key_id: str
    model: str
    status: Status
    created: float
    updated: float
    started: float | None
    finished: float | None
    attempts: int
    error: dict | None
    logs: str
    has_result: bool
    batch_key: str | None = None
    note: str | None = None

    @property
    def terminal(self) -> bool:
        return self.status in FINAL


# Columns of a job without its blobs: listing and polling must not read megabytes per row.
_INFO_COLUMNS = (
    _Job.id, _Job.key_id, _Job.model, _Job.status, _Job.created, _Job.updated, _Job.started,
    _Job.finished, _Job.attempts, _Job.error, _Job.logs, _Job.result.is_not(None).label("has_result"),
    _Job.batch_key, _Job.note,
)


def _info_from_columns(row: Any) -> JobInfo:
    return JobInfo(
        id=row.id, key_id=row.key_id, model=row.model, status=Status(row.status), created=row.created,
        updated=row.updated, started=row.started, finished=row.finished, attempts=row.attempts,
        error=json.loads(row.error) if row.error else None, logs=row.logs or "",
        has_result=bool(row.has_result), batch_key=row.batch_key, note=row.note,
    )


class JobStore(KeyStore, InstanceStore):
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
                   max_active: int = 0, max_stored_bytes: int = 0) -> str:
        """Store a request as RECEIVED and return its new id. With ``max_active``, refuse
        (``TooManyJobs``) when the key already has that many jobs received, queued or running;
        with ``max_stored_bytes``, refuse (``OverQuota``) when the results its jobs hold are at or
        over that many bytes. The counts and the insert are one transaction."""
        now = time.time()
        job_id = secrets.token_urlsafe(16)
        while job_id.startswith("-"):  # a command line would take it for an option (glassbox jobs)
            job_id = secrets.token_urlsafe(16)
        with self._session() as session:
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
            session.add(_Job(id=job_id, key_id=key_id, model=model, status=Status.RECEIVED, created=now,
                             updated=now, attempts=0, request=bytes(request), logs="", held_by=self.instance,
                             batch_key=batch_key))
        return job_id

    def mark_queued(self, job_id: str) -> bool:
        return self._transition(job_id, (Status.RECEIVED,), status=Status.QUEUED)

    def claim(self, job_id: str) -> bool:
        """QUEUED -> RUNNING, atomically: False if someone else took or cancelled it first."""
        now = time.time()
        with self._session() as session:
            done = session.execute(
                update(_Job).where(_Job.id == job_id, _Job.status == Status.QUEUED)
                .values(status=Status.RUNNING, started=now, updated=now, attempts=_Job.attempts + 1,
                        held_by=self.instance, note=None)
            )
            return done.rowcount == 1

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
               logs: str | None = None) -> bool:
        """Move a job that waits, or that runs here, to a final ``status``; False if it already was
        final (a cancel and a completion raced: the first one wins) or runs elsewhere."""
        if status not in FINAL:
            raise ValueError(f"finish() takes a final status {sorted(FINAL)}, got {status!r}")
        now = time.time()
        values: dict[str, Any] = {"status": status, "finished": now, "updated": now, "request": None,
                                  "result": result, "error": json.dumps(error) if error else None,
                                  "note": None}
        if logs is not None:
            # PostgreSQL text cannot hold NUL, which a job may print: on every database it reads
            # back as U+FFFD (one character for one, so log offsets stay right).
            values["logs"] = logs.replace("\x00", "\N{REPLACEMENT CHARACTER}")
        waiting = _Job.status.in_((Status.RECEIVED, Status.QUEUED))
        return self._change(job_id, or_(waiting, self._mine()), **values)

    def cancel(self, job_id: str, *, result: bytes | None = None) -> str | None:
        """Cancel a job that has not started (storing ``result`` as what its owner fetches), or
        flag a running one for the server that runs it (``cancel_requests``): returns its status
        afterwards (CANCELLED, RUNNING, or the final status it had), None if there is no such job."""
        now = time.time()
        with self._session() as session:
            session.execute(
                update(_Job).where(_Job.id == job_id, _Job.status.in_((Status.RECEIVED, Status.QUEUED)))
                .values(status=Status.CANCELLED, finished=now, updated=now, request=None, result=result)
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
            row = session.execute(select(*_INFO_COLUMNS).where(_Job.id == job_id)).first()
            return _info_from_columns(row) if row is not None else None

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
            old = session.scalar(select(func.length(_Job.result)).where(
                _Job.id == job_id, _Job.status.in_(tuple(FINAL))))
            if old is None:
                return 0
            session.execute(update(_Job).where(_Job.id == job_id).values(result=result, updated=time.time()))
        return max(0, int(old) - len(result))

    def queued(self, models: list[str] | None = None, limit: int | None = None) -> list[JobInfo]:
        """QUEUED jobs (for ``models`` only, if given), first to run first; at most ``limit``."""
        query = select(*_INFO_COLUMNS).where(_Job.status == Status.QUEUED)
        if models is not None:
            query = query.where(_Job.model.in_(list(models)))
        query = query.order_by(_Job.seq)
        if limit is not None:
            query = query.limit(limit)
        with self._session() as session:
            return [_info_from_columns(row) for row in session.execute(query)]

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
        """Bytes of results the key's jobs hold now (each one's framed result, as its owner
        fetches it), kept until the job expires (``delete_expired``)."""
        with self._session() as session:
            return _stored_bytes(session, key_id)

    def jobs_of(self, key_id: str) -> list[JobInfo]:
        with self._session() as session:
            rows = session.execute(select(*_INFO_COLUMNS).where(_Job.key_id == key_id).order_by(_Job.seq))
            return [_info_from_columns(row) for row in rows]

    def recent_jobs(self, statuses: tuple[str, ...] | None = None, limit: int = 50) -> list[JobInfo]:
        """Every key's jobs (in ``statuses``, if given), newest first, at most ``limit``: the
        operator's dashboard."""
        query = select(*_INFO_COLUMNS)
        if statuses is not None:
            query = query.where(_Job.status.in_(list(statuses)))
        with self._session() as session:
            return [_info_from_columns(row) for row in session.execute(query.order_by(_Job.seq.desc())
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

    def _settle(self, session: Session, row: Any, now: float, max_attempts: int) -> str | None:
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
        done = session.execute(update(_Job).where(*seen).values(**values))
        return outcome if done.rowcount == 1 else None

    def delete_expired(self, ttl_seconds: float, now: float | None = None) -> int:
        """Delete final jobs that finished more than ``ttl_seconds`` ago."""
        cutoff = (time.time() if now is None else now) - ttl_seconds
        with self._session() as session:
            done = session.execute(delete(_Job).where(_Job.status.in_(tuple(FINAL)), _Job.finished < cutoff))
            return done.rowcount


def _stored_bytes(session: Session, key_id: str) -> int:
    # length() of a BLOB / bytea is its size in bytes (SQLite reads it from the record header,
    # without loading the blob), so no size column has to be kept in step with the results.
    return int(session.scalar(select(func.coalesce(func.sum(func.length(_Job.result)), 0))
                              .where(_Job.key_id == key_id)) or 0)
