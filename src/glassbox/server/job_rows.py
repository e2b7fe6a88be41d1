"""The jobs table and the plain values read from it (store.py works on them).

Offers:
    _Job                              the table (metrics.py reads it for database-wide counts)
    JobInfo                           a plain snapshot of a job (no live database rows leak out)
    Finished                          what ``JobStore.finish`` kept: status, error, kept, and the
                                      job's model and times (for metrics)
    output_bytes(result, error, logs) the bytes a final job makes the store keep (its quota share)
    STORED_BYTES                      the same, as SQL over the table (old rows: their result's length)
    INFO_COLUMNS, info_from_columns   a job's columns without its blobs, and the JobInfo they make
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import BigInteger, Float, Index, Integer, LargeBinary, String, Text, func
from sqlalchemy.orm import Mapped, mapped_column

from ..remote.job import FINAL, Status
from .database import TableBase

__all__ = ["INFO_COLUMNS", "STORED_BYTES", "Finished", "JobInfo", "error_text", "info_from_columns",
           "output_bytes"]


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
    held_by: Mapped[str | None] = mapped_column(String(64), nullable=True)  # an instance (store.py)
    cancel_requested: Mapped[float | None] = mapped_column(Float, nullable=True)  # when, while RUNNING
    # jobs/batchable.py's key, decided once at submit (None: runs alone)
    batch_key: Mapped[str | None] = mapped_column(String(256), nullable=True)
    # What the server does for the job now ("loading gpt2"), while RUNNING: in the store, not in
    # one process's memory, because the API process asked may not be the one running the job.
    note: Mapped[str | None] = mapped_column(String(500), nullable=True)
    # Bytes the job makes the store keep once final (result + error + logs, output_bytes()): what
    # the key's quota counts. None while it is not final (and on rows from before the column).
    output_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)

    # ix_jobs_key_bytes: a key's stored bytes summed from the index alone (store._stored_bytes), never
    # from the rows, whose results SQLite keeps in overflow pages it would walk to reach the column.
    __table_args__ = (Index("ix_jobs_status_seq", "status", "seq"), Index("ix_jobs_finished", "finished"),
                      Index("ix_jobs_key_bytes", "key_id", "output_bytes"))


# What a key's jobs make the server keep, per job (an old row without the column: its result).
STORED_BYTES = func.coalesce(_Job.output_bytes, func.length(_Job.result), 0)


def output_bytes(result: bytes | None, error: dict | None, logs: str | None) -> int:
    """Bytes a final job makes the store keep: its framed result, its error as stored (JSON) and
    its printed output in UTF-8 (what ``finish`` records and the key's quota counts)."""
    return (len(result or b"") + (len(error_text(error)) if error else 0)
            + len((logs or "").encode("utf-8", "replace")))


def error_text(error: dict) -> str:
    return json.dumps(error)  # ensure_ascii: characters are bytes


@dataclass(frozen=True)
class Finished:
    """What ``finish`` stored: the job's final ``status`` and ``error``; ``kept`` is False when its
    output would have brought its key over the quota and a QuotaExceeded error took its place;
    ``model``, ``created``, ``started`` (None: it never ran) and ``finished`` as the row now holds
    them (read in the same statement)."""

    status: Status
    error: dict | None
    kept: bool = True
    # Not compared: the same outcome, whenever it happened.
    model: str = field(default="", compare=False)
    created: float = field(default=0.0, compare=False)
    started: float | None = field(default=None, compare=False)
    finished: float = field(default=0.0, compare=False)


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
INFO_COLUMNS = (
    _Job.id, _Job.key_id, _Job.model, _Job.status, _Job.created, _Job.updated, _Job.started,
    _Job.finished, _Job.attempts, _Job.error, _Job.logs, _Job.result.is_not(None).label("has_result"),
    _Job.batch_key, _Job.note,
)


def info_from_columns(row: Any) -> JobInfo:
    return JobInfo(
        id=row.id, key_id=row.key_id, model=row.model, status=Status(row.status), created=row.created,
        updated=row.updated, started=row.started, finished=row.finished, attempts=row.attempts,
        error=json.loads(row.error) if row.error else None, logs=row.logs or "",
        has_result=bool(row.has_result), batch_key=row.batch_key, note=row.note,
    )
