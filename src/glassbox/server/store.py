"""The durable job store: API keys and jobs in SQLite (default) or any SQLAlchemy 2 database.

Offers:
    JobStore(url)                     open (and create) the database
      .create_key(name, operator=False) -> (KeyInfo, key)   shown once; only its sha256 is stored
      .list_keys() / .revoke_key(name_or_id) / .authenticate(key) -> KeyInfo | None
      .create_job(key_id, model, request, max_active=0, max_stored_bytes=0) -> job id  (RECEIVED)
      .mark_queued(id) / .claim(id) / .requeue(id) / .finish(id, status, ...) / .cancel(id)
      .get(id) -> JobInfo | None / .request(id) / .result(id)
      .queued() -> [JobInfo] in FIFO order / .next_queued() / .position(id) / .active_count(key_id)
      .stored_bytes(key_id) -> bytes of results the key's jobs hold (until they expire)
      .recent_jobs(statuses=None, limit=50) / .result_sizes(ids)   every key's jobs (the dashboard)
      .recover() -> {what: count}       run once at startup: decide the fate of interrupted jobs
      .delete_expired(ttl_seconds) -> n
    KeyInfo, JobInfo                  plain snapshots (no live database rows leak out)
    TooManyJobs                       create_job refused: the key is at its max_active
    OverQuota                         create_job refused: the key's stored results are at its quota
    STATUSES, TERMINAL

    store = JobStore("sqlite:///tmp/glassbox.db")
    info, key = store.create_key("alice")
    assert store.authenticate(key).name == "alice"

Job lifecycle and durability (decisions):
    RECEIVED  the request is stored (create_job); the API process validates and then
    QUEUED    queues it (mark_queued) and answers the client with the id
    RUNNING   the worker took it (claim: an atomic QUEUED -> RUNNING, attempts += 1)
    COMPLETED / ERROR / CANCELLED   final; the request blob is dropped, the result kept
              ``result_ttl_seconds`` after ``finished``, then deleted (delete_expired)

    On startup ``recover`` settles what a dead server left behind:
    - QUEUED jobs stay queued, in their original order.
    - RUNNING jobs were interrupted by the server dying (a kill, a crash, a reboot), not
      necessarily by the job: they go back to the head of the queue, once. A job that was
      already run ``MAX_ATTEMPTS`` times fails instead ("the server stopped while running this
      job N times"), so a job that itself kills the server cannot put it in a crash loop.
      (A worker crash while the server lives is blamed on the job at once: see worker.py.)
    - RECEIVED jobs never got their id back to the client (the server died before answering),
      so nobody can fetch them: they fail rather than run unrequested.

``recover`` assumes that no other server is running jobs from the database: it requeues (or
fails) every RUNNING and RECEIVED job, whoever holds it.

PostgreSQL (``postgresql+psycopg://user@host/db``) lets several API processes share one
database: ``claim`` is one conditional UPDATE (``... WHERE status = 'QUEUED'``) whose row count
says who won, which stays right under READ COMMITTED with claimers in other processes;
``create_job`` takes a per-key advisory lock so that ``max_active`` and the quota hold across
processes; the tables are created under an advisory lock (servers may start at once).

SQLite is used from many threads of one process: every transaction takes one lock (SQLite
writes are serialised anyway) and WAL journaling lets readers of other processes (``glassbox
keys``) work while the server runs. Timestamps are seconds since the epoch (UTC), as floats.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Boolean,
    Float,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    create_engine,
    delete,
    event,
    false,
    func,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from ..remote.protocol import FINAL_STATUSES, JOB_STATUSES

__all__ = [
    "MAX_ATTEMPTS",
    "STATUSES",
    "TERMINAL",
    "JobInfo",
    "JobStore",
    "KeyInfo",
    "OverQuota",
    "TooManyJobs",
    "hash_key",
]

STATUSES = JOB_STATUSES  # the protocol's names: clients see these
TERMINAL = FINAL_STATUSES
ACTIVE = ("RECEIVED", "QUEUED", "RUNNING")
MAX_ATTEMPTS = 2
KEY_PREFIX = "gbx_"
_SCHEMA_LOCK = 0x676C617373626F78  # PostgreSQL advisory lock id ("glassbox")


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


def hash_key(key: str) -> str:
    # Keys are 256 random bits, so a plain (unsalted, fast) hash cannot be brute-forced and
    # lets authentication be one indexed lookup.
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class _Base(DeclarativeBase):
    pass


class _ApiKey(_Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created: Mapped[float] = mapped_column(Float)
    revoked: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Operators see every tenant's queue and replicas on the dashboard (never their code or values).
    operator: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class _Job(_Base):
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

    __table_args__ = (Index("ix_jobs_status_seq", "status", "seq"), Index("ix_jobs_finished", "finished"))


@dataclass(frozen=True)
class KeyInfo:
    id: str
    name: str
    created: float
    revoked: float | None
    operator: bool = False  # sees the whole server on the dashboard


@dataclass(frozen=True)
class JobInfo:
    id: str
    key_id: str
    model: str
    status: str
    created: float
    updated: float
    started: float | None
    finished: float | None
    attempts: int
    error: dict | None
    logs: str
    has_result: bool

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


def _key_info(row: _ApiKey) -> KeyInfo:
    return KeyInfo(row.id, row.name, row.created, row.revoked, bool(row.operator))


# Columns of a job without its blobs: listing and polling must not read megabytes per row.
_INFO_COLUMNS = (
    _Job.id, _Job.key_id, _Job.model, _Job.status, _Job.created, _Job.updated, _Job.started,
    _Job.finished, _Job.attempts, _Job.error, _Job.logs, _Job.result.is_not(None).label("has_result"),
)


def _info_from_columns(row: Any) -> JobInfo:
    return JobInfo(
        id=row.id, key_id=row.key_id, model=row.model, status=row.status, created=row.created,
        updated=row.updated, started=row.started, finished=row.finished, attempts=row.attempts,
        error=json.loads(row.error) if row.error else None, logs=row.logs or "",
        has_result=bool(row.has_result),
    )


class JobStore:
    """API keys and jobs, in the database at ``url`` (created if missing).

        store = JobStore("sqlite://")            # in memory, for tests
        job = store.create_job("k1", "gpt2", b"...")
        store.mark_queued(job)
        assert store.next_queued().id == job
    """

    def __init__(self, url: str) -> None:
        self.url = url
        parsed = make_url(url)
        self._sqlite = parsed.get_backend_name() == "sqlite"
        kwargs: dict[str, Any] = {}
        if self._sqlite:
            database = parsed.database
            if database and database != ":memory:":
                Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
            else:
                # One shared connection, or each thread would see its own empty in-memory database.
                from sqlalchemy.pool import StaticPool

                kwargs["poolclass"] = StaticPool
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        else:
            # A database server may drop idle connections (restart, failover, idle timeout):
            # test each one as it leaves the pool rather than fail the request that gets it.
            kwargs["pool_pre_ping"] = True
        self._postgres = parsed.get_backend_name() == "postgresql"
        self.engine: Engine = create_engine(url, **kwargs)
        if self._sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
        with self._schema_lock():
            _Base.metadata.create_all(self.engine)
            _add_missing_columns(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        # SQLite: one writer at a time anyway, and a shared in-memory connection needs it.
        self._lock: contextlib.AbstractContextManager = (
            threading.RLock() if self._sqlite else contextlib.nullcontext()
        )

    def close(self) -> None:
        self.engine.dispose()

    @contextlib.contextmanager
    def _session(self) -> Iterator[Session]:
        with self._lock, self._sessions.begin() as session:
            yield session

    @contextlib.contextmanager
    def _schema_lock(self) -> Iterator[None]:
        """PostgreSQL: one process at a time creates or alters the tables. Several API processes
        starting at once on a new database would otherwise all see the tables missing and all
        create them (all but one then fail). Not done for SQLite: one server per file, and a
        ``glassbox keys`` racing that server's very first start is the only other opener."""
        if not self._postgres:
            yield
            return
        with self.engine.connect() as connection:
            # A session lock on its own connection: the DDL runs on others, in its own transactions.
            connection.execute(select(func.pg_advisory_lock(_SCHEMA_LOCK)))
            try:
                yield
            finally:
                connection.execute(select(func.pg_advisory_unlock(_SCHEMA_LOCK)))

    def _lock_key(self, session: Session, key_id: str) -> None:
        """PostgreSQL: serialise ``create_job`` per key until the transaction ends, so that two
        submissions cannot both count N-1 active jobs and both insert (READ COMMITTED does not
        see the other's uncommitted row). SQLite transactions already run one at a time."""
        if self._postgres:
            digest = hashlib.sha256(f"glassbox-key:{key_id}".encode()).digest()
            lock_id = int.from_bytes(digest[:8], "big", signed=True)
            session.execute(select(func.pg_advisory_xact_lock(lock_id)))

    # ------------------------------------------------------------ keys

    def create_key(self, name: str, *, operator: bool = False) -> tuple[KeyInfo, str]:
        """A new key for ``name`` (an operator's with ``operator``); the plain key is only ever in
        the return value."""
        name = name.strip()
        if not name:
            raise ValueError("a key needs a name (who or what uses it)")
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        row = _ApiKey(id=secrets.token_hex(6), name=name, key_hash=hash_key(key), created=time.time(),
                      operator=bool(operator))
        with self._session() as session:
            session.add(row)
            session.flush()
            info = _key_info(row)
        return info, key

    def list_keys(self, include_revoked: bool = True) -> list[KeyInfo]:
        with self._session() as session:
            query = select(_ApiKey).order_by(_ApiKey.created)
            if not include_revoked:
                query = query.where(_ApiKey.revoked.is_(None))
            return [_key_info(row) for row in session.scalars(query)]

    def revoke_key(self, name_or_id: str) -> list[KeyInfo]:
        """Revoke the key with this id, else every active key with this name; returns those revoked."""
        with self._session() as session:
            rows = list(session.scalars(select(_ApiKey).where(_ApiKey.id == name_or_id,
                                                              _ApiKey.revoked.is_(None))))
            if not rows:
                rows = list(session.scalars(select(_ApiKey).where(_ApiKey.name == name_or_id,
                                                                  _ApiKey.revoked.is_(None))))
            now = time.time()
            for row in rows:
                row.revoked = now
            return [_key_info(row) for row in rows]

    def authenticate(self, key: str | None) -> KeyInfo | None:
        if not key:
            return None
        with self._session() as session:
            row = session.scalar(select(_ApiKey).where(_ApiKey.key_hash == hash_key(key),
                                                       _ApiKey.revoked.is_(None)))
            return _key_info(row) if row is not None else None

    # ------------------------------------------------------------ jobs

    def create_job(self, key_id: str, model: str, request: bytes, *, max_active: int = 0,
                   max_stored_bytes: int = 0) -> str:
        """Store a request as RECEIVED and return its new id. With ``max_active``, refuse
        (``TooManyJobs``) when the key already has that many jobs received, queued or running;
        with ``max_stored_bytes``, refuse (``OverQuota``) when the results its jobs hold are at or
        over that many bytes. The counts and the insert are one transaction."""
        now = time.time()
        job_id = secrets.token_urlsafe(16)
        with self._session() as session:
            if max_active or max_stored_bytes:
                self._lock_key(session, key_id)
            if max_active:
                active = session.scalar(select(func.count()).select_from(_Job).where(
                    _Job.key_id == key_id, _Job.status.in_(ACTIVE))) or 0
                if active >= max_active:
                    raise TooManyJobs(active, max_active)
            if max_stored_bytes:
                stored = _stored_bytes(session, key_id)
                if stored >= max_stored_bytes:
                    raise OverQuota(stored, max_stored_bytes)
            session.add(_Job(id=job_id, key_id=key_id, model=model, status="RECEIVED", created=now,
                             updated=now, attempts=0, request=bytes(request), logs=""))
        return job_id

    def mark_queued(self, job_id: str) -> bool:
        return self._transition(job_id, ("RECEIVED",), status="QUEUED")

    def claim(self, job_id: str) -> bool:
        """QUEUED -> RUNNING, atomically: False if someone else took or cancelled it first."""
        now = time.time()
        with self._session() as session:
            done = session.execute(
                update(_Job).where(_Job.id == job_id, _Job.status == "QUEUED")
                .values(status="RUNNING", started=now, updated=now, attempts=_Job.attempts + 1)
            )
            return done.rowcount == 1

    def requeue(self, job_id: str) -> bool:
        """RUNNING -> QUEUED (keeping its place at the head of the queue) for a job the server
        interrupted itself, e.g. on shutdown; the attempt does not count against the job."""
        return self._transition(job_id, ("RUNNING",), status="QUEUED", started=None, logs="",
                                attempts=_Job.attempts - 1)

    def retry(self, job_id: str) -> bool:
        """RUNNING -> QUEUED at the head of the queue for a job whose worker died under it: unlike
        ``requeue`` the attempt counts (the worker decides from ``attempts`` whether to retry)."""
        return self._transition(job_id, ("RUNNING",), status="QUEUED", started=None, logs="")

    def finish(self, job_id: str, status: str, *, result: bytes | None = None, error: dict | None = None,
               logs: str | None = None) -> bool:
        """Move a job that is not final yet to a final ``status``; False if it already was final
        (a cancel and a completion raced: the first one wins)."""
        if status not in TERMINAL:
            raise ValueError(f"finish() takes a final status {sorted(TERMINAL)}, got {status!r}")
        now = time.time()
        values: dict[str, Any] = {"status": status, "finished": now, "updated": now, "request": None,
                                  "result": result, "error": json.dumps(error) if error else None}
        if logs is not None:
            # PostgreSQL text cannot hold NUL, which a job may print: on every database it reads
            # back as U+FFFD (one character for one, so log offsets stay right).
            values["logs"] = logs.replace("\x00", "\N{REPLACEMENT CHARACTER}")
        with self._session() as session:
            done = session.execute(
                update(_Job).where(_Job.id == job_id, _Job.status.in_(ACTIVE)).values(**values)
            )
            return done.rowcount == 1

    def cancel(self, job_id: str, *, result: bytes | None = None) -> str | None:
        """Cancel a job that has not started (storing ``result`` as what its owner fetches):
        returns its status afterwards (CANCELLED, or RUNNING / a final status that cancelling
        here cannot change), None if there is no such job."""
        now = time.time()
        with self._session() as session:
            session.execute(
                update(_Job).where(_Job.id == job_id, _Job.status.in_(("RECEIVED", "QUEUED")))
                .values(status="CANCELLED", finished=now, updated=now, request=None, result=result)
            )
            return session.scalar(select(_Job.status).where(_Job.id == job_id))

    def _transition(self, job_id: str, before: tuple[str, ...], **values: Any) -> bool:
        values.setdefault("updated", time.time())
        with self._session() as session:
            done = session.execute(
                update(_Job).where(_Job.id == job_id, _Job.status.in_(before)).values(**values)
            )
            return done.rowcount == 1

    def get(self, job_id: str) -> JobInfo | None:
        with self._session() as session:
            row = session.execute(select(*_INFO_COLUMNS).where(_Job.id == job_id)).first()
            return _info_from_columns(row) if row is not None else None

    def request(self, job_id: str) -> bytes | None:
        with self._session() as session:
            return session.scalar(select(_Job.request).where(_Job.id == job_id))

    def result(self, job_id: str) -> bytes | None:
        with self._session() as session:
            return session.scalar(select(_Job.result).where(_Job.id == job_id))

    def queued(self, models: list[str] | None = None, limit: int | None = None) -> list[JobInfo]:
        """QUEUED jobs (for ``models`` only, if given), first to run first; at most ``limit``."""
        query = select(*_INFO_COLUMNS).where(_Job.status == "QUEUED")
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
            if row is None or row.status != "QUEUED":
                return None
            return session.scalar(select(func.count()).select_from(_Job).where(
                _Job.status == "QUEUED", _Job.seq < row.seq)) or 0

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

    def recover(self, max_attempts: int = MAX_ATTEMPTS) -> dict[str, int]:
        """Settle jobs a previous server process left unfinished (see the module docstring)."""
        now = time.time()
        counts = {"requeued": 0, "failed": 0, "dropped": 0, "queued": 0}
        with self._session() as session:
            for row in session.scalars(select(_Job).where(_Job.status.in_(ACTIVE)).order_by(_Job.seq)):
                if row.status == "QUEUED":
                    counts["queued"] += 1
                    continue
                row.updated = now
                if row.status == "RECEIVED":
                    row.status, row.finished, row.request = "ERROR", now, None
                    row.error = json.dumps({
                        "type": "ServerRestarted",
                        "message": "the server stopped before it could queue this job; submit it again",
                    })
                    counts["dropped"] += 1
                elif row.attempts < max_attempts:
                    row.status, row.started = "QUEUED", None
                    row.logs = ""  # the rerun prints everything again
                    counts["requeued"] += 1
                else:
                    row.status, row.finished, row.request = "ERROR", now, None
                    row.error = json.dumps({
                        "type": "ServerRestarted",
                        "message": (
                            f"the server stopped while running this job {row.attempts} times; it is not "
                            "run again in case the job itself is what stops the server"
                        ),
                    })
                    counts["failed"] += 1
        return counts

    def delete_expired(self, ttl_seconds: float, now: float | None = None) -> int:
        """Delete final jobs that finished more than ``ttl_seconds`` ago."""
        cutoff = (time.time() if now is None else now) - ttl_seconds
        with self._session() as session:
            done = session.execute(delete(_Job).where(_Job.status.in_(TERMINAL), _Job.finished < cutoff))
            return done.rowcount


def _add_missing_columns(engine: Engine) -> None:
    # create_all makes missing tables, never missing columns: a database from before a column
    # existed gets it here (the only migration so far; each column's default fills old rows).
    present = {column["name"] for column in inspect(engine).get_columns("api_keys")}
    if "operator" not in present:
        with engine.begin() as connection:
            connection.execute(
                text("ALTER TABLE api_keys ADD COLUMN operator BOOLEAN NOT NULL DEFAULT FALSE"))


def _stored_bytes(session: Session, key_id: str) -> int:
    # length() of a BLOB / bytea is its size in bytes (SQLite reads it from the record header,
    # without loading the blob), so no size column has to be kept in step with the results.
    return int(session.scalar(select(func.coalesce(func.sum(func.length(_Job.result)), 0))
                              .where(_Job.key_id == key_id)) or 0)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        # WAL: `glassbox keys` (another process) can read and write while the server runs.
        cursor.execute("PRAGMA journal_mode=WAL")
        # FULL: a job the client was told is queued survives a power cut, not only a kill.
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA busy_timeout=30000")
    finally:
        cursor.close()
