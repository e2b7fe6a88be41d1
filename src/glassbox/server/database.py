"""The database under the job store: the engine, transactions, and the tables made or updated.

Offers:
    TableBase              the declarative base of every table (keys.py, instances.py, store.py)
    Database(url)          an engine on SQLite (a file, or ``sqlite://`` in memory) or any SQLAlchemy 2
                           URL; every table defined so far is created, and old ones get new columns
      ._session(durable=True)   one transaction (a Core connection: statements, no ORM objects);
                           durable=False: its commit does not wait for the disk
      ._advisory_lock(session, name)   PostgreSQL: one such transaction at a time per ``name``
      .close()

    class Things(Database): ...        # the stores derive from it; see store.JobStore

SQLite is used from many threads of one process: every transaction takes one lock (SQLite
writes are serialised anyway) and WAL journaling lets readers of other processes (``glassbox
keys``) work while the server runs. PostgreSQL (``postgresql+psycopg://user@host/db``) may be
shared by several API processes: the tables are created under an advisory lock (servers may
start at once), and connections are tested as they leave the pool.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, func, inspect, select, text
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.orm import DeclarativeBase

__all__ = ["Database", "TableBase"]

_SCHEMA_LOCK = 0x676C617373626F78  # PostgreSQL advisory lock id ("glassbox")

# create_all makes missing tables, never missing columns: a database from before a column existed
# gets it here (each column's default fills the old rows). (table, column, its SQL type and default)
_ADDED_COLUMNS = (
    ("api_keys", "operator", "BOOLEAN NOT NULL DEFAULT FALSE"),
    ("jobs", "held_by", "VARCHAR(64)"),
    ("jobs", "cancel_requested", "FLOAT"),
    ("jobs", "batch_key", "VARCHAR(256)"),
    ("jobs", "note", "VARCHAR(500)"),
    ("jobs", "output_bytes", "BIGINT"),
)
_ADDED_INDEXES = (
    ("ix_jobs_key_bytes", "jobs", "key_id, output_bytes"),
)


class TableBase(DeclarativeBase):
    pass


class Database:
    """Engine and transactions for the stores (see the module docstring).

        db = Database("sqlite://")               # in memory, for tests
        with db._session() as session: ...
    """

    def __init__(self, url: str) -> None:
        self.url = url
        parsed = make_url(url)
        self._sqlite = parsed.get_backend_name() == "sqlite"
        self._postgres = parsed.get_backend_name() == "postgresql"
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
        self.engine: Engine = create_engine(url, **kwargs)
        # What _session(durable=False) runs on: the same database, but a commit does not wait for
        # the disk (SQLite: its own connections with synchronous=NORMAL; PostgreSQL: SET LOCAL
        # synchronous_commit). An in-memory SQLite database is one shared connection: the same engine.
        self._relaxed: Engine = self.engine
        if self._sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
            if "poolclass" not in kwargs:
                self._relaxed = create_engine(url, **kwargs)
                event.listen(self._relaxed, "connect", _sqlite_relaxed_pragmas)
        with self._schema_lock():
            TableBase.metadata.create_all(self.engine)
            _add_missing_columns(self.engine)
            _add_missing_indexes(self.engine)
        # SQLite: one writer at a time anyway, and a shared in-memory connection needs it.
        self._lock: contextlib.AbstractContextManager = (
            threading.RLock() if self._sqlite else contextlib.nullcontext()
        )

    def close(self) -> None:
        self.engine.dispose()
        self._relaxed.dispose()

    @contextlib.contextmanager
    def _session(self, durable: bool = True) -> Iterator[Connection]:
        """One transaction. ``durable=False``: its commit does not wait for the disk, so a power cut
        (not a crash of this process: SQLite's WAL and PostgreSQL's log keep those) may undo it,
        never half of it, and never an earlier durable commit's; a later durable commit makes it
        durable too. For what a restart makes good anyway: a job's claim and its finish (a job
        whose either was undone is RUNNING, and recovery runs it again). Measured on SQLite
        here, two servers alternating: a tiny trace's remote round trip with every commit relaxed
        29.2 -> 26.8 ms; with only the claim and the finish relaxed, about 1-2 ms less than all
        durable (admission must stay durable)."""
        # A Core connection, not an ORM Session: the stores run statements and read rows, and a
        # Session's bookkeeping cost 0.1-0.5 ms a transaction (claim 0.94 -> 0.63 ms, finish 1.92 ->
        # 1.42 on SQLite), several of which every job pays in the API process.
        with self._lock, (self.engine if durable else self._relaxed).begin() as session:
            if not durable and self._postgres:
                session.exec_driver_sql("SET LOCAL synchronous_commit TO OFF")
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

    def _advisory_lock(self, session: Connection, name: str) -> None:
        """PostgreSQL: hold a lock named ``name`` until the transaction ends, so that two processes'
        transactions that check and then write (count, then insert) run one after the other (READ
        COMMITTED does not see the other's uncommitted row). SQLite transactions already do."""
        if self._postgres:
            lock_id = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
            session.execute(select(func.pg_advisory_xact_lock(lock_id)))


def _add_missing_indexes(engine: Engine) -> None:
    """The indexes of tables made before them (create_all makes indexes only with a new table)."""
    with engine.begin() as connection:
        for name, table, columns in _ADDED_INDEXES:
            connection.execute(text(f"CREATE INDEX IF NOT EXISTS {name} ON {table} ({columns})"))


def _add_missing_columns(engine: Engine) -> None:
    inspector = inspect(engine)
    tables = set(inspector.get_table_names())
    for table, column, declaration in _ADDED_COLUMNS:
        if table in tables and column not in {found["name"] for found in inspector.get_columns(table)}:
            with engine.begin() as connection:
                connection.execute(text(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}"))


def _sqlite_pragmas(dbapi_connection: Any, _record: Any, synchronous: str = "FULL") -> None:
    cursor = dbapi_connection.cursor()
    try:
        # WAL: `glassbox keys` (another process) can read and write while the server runs.
        cursor.execute("PRAGMA journal_mode=WAL")
        # FULL: a job the client was told is queued survives a power cut, not only a kill (a
        # connection may not change it inside a transaction: _session(durable=False) has its own).
        cursor.execute(f"PRAGMA synchronous={synchronous}")
        cursor.execute("PRAGMA busy_timeout=30000")
    finally:
        cursor.close()


def _sqlite_relaxed_pragmas(dbapi_connection: Any, record: Any) -> None:
    _sqlite_pragmas(dbapi_connection, record, synchronous="NORMAL")
