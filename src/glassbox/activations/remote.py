"""The extraction loop against a glassbox server: one remote job per batch, a few in flight.

Offers:
    run_remote(model, plan, batches, writer, progress, in_flight=3)

Each batch is one ordinary remote trace (``block.trace_batch`` with ``remote=True,
blocking=False``): the server runs the block, reductions included, under its sandbox, and the
job's result is exactly one shard's worth. So results stream back a chunk at a time as they are
ready, the server's ``--max-result-bytes`` applies to each chunk, and its per-key stored-bytes
quota bounds what waits on the server. ``in_flight`` jobs are kept submitted so the server never
waits for this client; results are written in document order.

Failures: a lost connection while fetching a result is retried (the finished job keeps its
result on the server); a 429 (rate limit, too many jobs, quota) waits for the jobs in flight, or
backs off, then says what happened; a killed client loses only its jobs in flight: running the
same ``extract`` call again resumes from the index.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from ..config import CONFIG
from ..errors import RemoteError
from .batches import Batch
from .block import trace_batch
from .local import store
from .plan import Plan
from .progress import Progress
from .writer import ShardWriter

_PATIENCE_SECONDS = 120.0  # how long a refused submission (429) is retried with nothing in flight
_FETCH_TRIES = 6


def run_remote(model: Any, plan: Plan, batches: Iterable[Batch], writer: ShardWriter, progress: Progress,
               in_flight: int = 3) -> None:
    pending: deque[tuple[Batch, Any]] = deque()  # (batch, its JobHandle; None: nothing to run)
    source: Iterator[Batch] = iter(batches)
    held: Batch | None = None  # a batch whose submission the server deferred
    with _status_lines_off():
        while True:
            while len(pending) < in_flight:
                batch = held if held is not None else next(source, None)
                held = None
                if batch is None:
                    break
                if batch.empty:
                    pending.append((batch, None))
                    continue
                job = _submit(model, batch, plan, others_in_flight=bool(pending))
                if job is None:
                    held = batch  # refused for now: collect a result first, then try again
                    break
                pending.append((batch, job))
            if not pending:
                return
            batch, job = pending.popleft()
            store(writer, progress, batch, {} if job is None else _fetch(job)["out"])
            if job is not None:
                _forget(job)


def _submit(model: Any, batch: Batch, plan: Plan, others_in_flight: bool) -> Any:
    """The JobHandle of the batch's job; None when refused (429) while other jobs are in flight."""
    waited, delay = 0.0, 0.5
    while True:
        try:
            return trace_batch(model, batch, plan, remote=True)
        except RemoteError as err:
            if err.status_code != 429:
                raise
            if others_in_flight:
                return None
            if waited >= _PATIENCE_SECONDS:
                raise RemoteError(
                    f"{err} (extract() waited {waited:.0f} s; what is done is in the index: run the same "
                    "extract() call again later to go on from there)", 429) from None
            time.sleep(delay)
            waited += delay
            delay = min(delay * 2, 10.0)


def _fetch(job: Any) -> dict:
    """The job's saved values; a lost connection is retried, a failed job raises its error."""
    for attempt in range(_FETCH_TRIES):
        try:
            return job.result()
        except MemoryError as err:  # the server's result limit applies to each batch's result
            raise MemoryError(f"{err}\nextract(): one batch's result must fit that limit: lower "
                              "batch_tokens, or reduce on the server (positions=, project=, pool=, "
                              "topk=, dtype=)") from None
        except RemoteError as err:
            if err.status_code is not None or attempt == _FETCH_TRIES - 1 or not _unreachable(job):
                raise
            time.sleep(min(2.0**attempt, 10.0))
    raise AssertionError("unreachable")


def _forget(job: Any) -> None:
    """The chunk is on disk: drop it from the server now, so that a long extraction holds at most
    the chunks in flight against the key's stored-bytes quota (not all it fetched until expiry)."""
    try:
        job.forget()
    except RemoteError:  # best effort: the result expires on the server anyway
        pass


def _unreachable(job: Any) -> bool:
    """Is the server out of reach (retry), rather than the job failed (raise)?"""
    try:
        job.status()
    except RemoteError as err:
        return err.status_code is None or err.status_code >= 500
    return False


@contextmanager
def _status_lines_off() -> Iterator[None]:
    # one job per batch: the per-job status line would fight with the progress bar
    before = CONFIG.STATUS
    CONFIG.STATUS = False
    try:
        yield
    finally:
        CONFIG.STATUS = before
