"""The server processes sharing a database, and which of them live: instance ids and heartbeats.

Offers:
    InstanceStore(url)         the instance half of ``store.JobStore``; ``self.instance`` is this one's id
      .begin_life()            this instance (re)starts: it is alive from now on (``recover`` calls it)
      .heartbeat()             it is still alive (``Heartbeat`` calls it every few seconds)
      .leave()                 it stopped cleanly: what it left behind may be settled at once
      .instances() -> [InstanceInfo]   every recorded instance, the latest heartbeat first
    InstanceSlot(state_dir)    this process's instance id, the same across restarts (.id, .release())
    Heartbeat(store, ...)      a thread: ``store.heartbeat()``, then ``store.requeue_orphans()``, every
                               ``timeout / 6`` seconds
    instance_timeout()         seconds without a heartbeat after which an instance is presumed dead:
                               $GLASSBOX_INSTANCE_TIMEOUT, else INSTANCE_TIMEOUT (30)
    new_instance_id()          ``<hostname>-<random>``

Why: several API processes may share one database (PostgreSQL). A server that dies leaves jobs
RUNNING (or RECEIVED) that nobody will finish, and a server that starts must not mistake the jobs
that live servers hold for those. So each job records the instance holding it (``jobs.held_by``:
the one that received it, then the one that claimed it), each instance keeps its row here fresh,
and a job is an orphan only when its holder stopped, restarted since it took the job, or went
quiet for longer than the timeout (``store.JobStore.requeue_orphans`` decides).
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from sqlalchemy import Float, Integer, String, delete, insert, select, update
from sqlalchemy.orm import Mapped, mapped_column

from .database import Database, TableBase

__all__ = ["INSTANCE_TIMEOUT", "Heartbeat", "InstanceInfo", "InstanceSlot", "InstanceStore",
           "instance_timeout", "new_instance_id"]

# Long enough to ride out a stalled database connection or a swamped host (at a heartbeat every
# timeout / 6 seconds, six in a row must be missed); short enough that the jobs of a crashed
# server wait at most this long for another one. Tests shorten it with the variable.
INSTANCE_TIMEOUT = 30.0
_TIMEOUT_VARIABLE = "GLASSBOX_INSTANCE_TIMEOUT"
_FORGET_SECONDS = 86400.0  # rows of instances silent this long are deleted
_SLOTS = 64  # most live servers sharing one state dir that each keep their id across restarts


def instance_timeout() -> float:
    value = os.environ.get(_TIMEOUT_VARIABLE, "")
    try:
        return float(value) if value.strip() else INSTANCE_TIMEOUT
    except ValueError:
        raise ValueError(f"${_TIMEOUT_VARIABLE} must be a number of seconds, got {value!r}") from None


def new_instance_id() -> str:
    return f"{socket.gethostname()[:40]}-{secrets.token_hex(6)}"


class _Instance(TableBase):
    __tablename__ = "instances"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    started: Mapped[float] = mapped_column(Float)  # when its current life began
    heartbeat: Mapped[float] = mapped_column(Float)  # 0 once it stopped cleanly


@dataclass(frozen=True)
class InstanceInfo:
    id: str
    host: str
    pid: int
    started: float
    heartbeat: float


class InstanceStore(Database):
    """This instance's row in the ``instances`` table (see the module docstring).

        store = JobStore(url, instance="api-1")
        store.begin_life(); store.heartbeat(); store.leave()
    """

    instance: str
    _life_started: float | None = None

    def begin_life(self) -> None:
        self._life_started = time.time()
        self._beat(self._life_started)

    def heartbeat(self) -> None:
        if self._life_started is None:
            self.begin_life()
            return
        self._beat(time.time())

    def _beat(self, now: float) -> None:
        assert self._life_started is not None
        with self._session() as session:
            beat = {"started": self._life_started, "heartbeat": now, "pid": os.getpid()}
            known = session.execute(update(_Instance).where(_Instance.id == self.instance).values(**beat))
            if known.rowcount == 0:  # the first life, or forgotten after a long silence
                session.execute(insert(_Instance).values(id=self.instance, host=socket.gethostname()[:255],
                                                         **beat))
            session.execute(delete(_Instance).where(_Instance.heartbeat < now - _FORGET_SECONDS,
                                                    _Instance.id != self.instance))

    def leave(self) -> None:
        if self._life_started is None:
            return
        with self._session() as session:
            session.execute(update(_Instance).where(_Instance.id == self.instance,
                                                    _Instance.started == self._life_started)
                            .values(heartbeat=0.0))

    def instances(self) -> list[InstanceInfo]:
        with self._session() as session:
            rows = session.execute(select(_Instance).order_by(_Instance.heartbeat.desc()))
            return [InstanceInfo(r.id, r.host, r.pid, r.started, r.heartbeat) for r in rows]


class InstanceSlot:
    """This process's instance id, kept across restarts: the id written in the first
    ``<state_dir>/instance-<n>.id`` that no live process holds (an exclusive ``flock``, which the
    kernel drops when its process dies, SIGKILL included). A restarted server so takes up its
    previous life's id, and at once settles the jobs that life left, while live servers that share
    a state dir each get their own. Where files cannot be locked, a fresh id every start.

        slot = InstanceSlot(Path("~/.glassbox/server").expanduser())
        store = JobStore(url, instance=slot.id)
    """

    def __init__(self, state_dir: Path) -> None:
        self.id = ""
        self._file: IO[str] | None = None
        try:
            import fcntl
        except ImportError:  # not POSIX
            fcntl = None
        if fcntl is not None:
            try:
                self._take(Path(state_dir), fcntl)
            except OSError:  # an unwritable state dir: no id to keep
                self.release()
        self.id = self.id or new_instance_id()

    def _take(self, folder: Path, fcntl: Any) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for slot in range(_SLOTS):
            handle = open(folder / f"instance-{slot}.id", "a+", encoding="utf-8")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # a live process holds this one
                handle.close()
                continue
            handle.seek(0)
            found = handle.read().strip()
            if not found:
                found = new_instance_id()
                handle.write(found + "\n")
                handle.flush()
            self.id, self._file = found, handle
            return

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the lock
            self._file = None


class Heartbeat:
    """Keeps this instance alive in the database and settles the jobs of dead ones, in a thread of
    its own: a busy event loop or a full thread pool must not make a live server look dead.

        beat = Heartbeat(store, on_requeued=worker.wake, say=print)
        beat.start()
        ...
        beat.stop()         # then store.leave()
    """

    def __init__(self, store: Any, *, timeout: float | None = None,
                 on_requeued: Callable[[], None] | None = None,
                 say: Callable[[str], None] | None = None) -> None:
        self.store = store
        self.timeout = instance_timeout() if timeout is None else float(timeout)
        self.period = self.timeout / 6
        self.on_requeued = on_requeued or (lambda: None)
        self.say = say or (lambda text: None)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="glassbox-heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            self.beat()

    def beat(self) -> None:
        try:
            self.store.heartbeat()
            counts = self.store.requeue_orphans(timeout=self.timeout)
        except Exception:  # a database hiccup: the next beat tries again
            self.say(f"heartbeat failed (retrying in {self.period:g} s):\n{traceback.format_exc()}")
            return
        if counts["requeued"] or counts["failed"] or counts["dropped"] or counts["cancelled"]:
            self.say(f"jobs of a server that stopped: {counts['requeued']} queued again, "
                     f"{counts['failed'] + counts['dropped']} failed, {counts['cancelled']} cancelled")
            self.on_requeued()
