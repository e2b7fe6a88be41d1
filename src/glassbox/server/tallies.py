"""Counts over the whole job table, for the metrics endpoint (``api/metrics.py``).

Offers:
    Tallies                  jobs by (model, status) and by (key id, status), the oldest queued job's
                             creation time per model, and the bytes each key's jobs keep stored
    TallyStore(Database)     .tallies() -> Tallies: the four counts in one transaction
                             (``store.JobStore`` derives from it, as from ``KeyStore``)

Why here and not in the metrics module: the queries are the store's business (its tables, its
transactions); metrics only turns the numbers into Prometheus families.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select

from ..remote.job import Status
from .database import Database
from .job_rows import STORED_BYTES, _Job

__all__ = ["Tallies", "TallyStore"]


@dataclass(frozen=True)
class Tallies:
    by_model: dict[tuple[str, str], int]  # (model, status) -> jobs
    oldest_queued: dict[str, float]  # model -> the created time of its longest-waiting queued job
    by_key: dict[tuple[str, str], int]  # (key id, status) -> jobs
    stored_by_key: dict[str, int]  # key id -> bytes its jobs keep (results, errors, printed output)


class TallyStore(Database):
    def tallies(self) -> Tallies:
        with self._session() as session:
            by_model = session.execute(select(_Job.model, _Job.status, func.count())
                                       .group_by(_Job.model, _Job.status)).all()
            oldest = session.execute(select(_Job.model, func.min(_Job.created))
                                     .where(_Job.status == Status.QUEUED).group_by(_Job.model)).all()
            by_key = session.execute(select(_Job.key_id, _Job.status, func.count())
                                     .group_by(_Job.key_id, _Job.status)).all()
            stored = session.execute(select(_Job.key_id, func.coalesce(func.sum(STORED_BYTES), 0))
                                     .group_by(_Job.key_id)).all()
        return Tallies(
            by_model={(model, str(status)): int(n) for model, status, n in by_model},
            oldest_queued={model: float(created) for model, created in oldest if created is not None},
            by_key={(key_id, str(status)): int(n) for key_id, status, n in by_key},
            stored_by_key={key_id: int(size or 0) for key_id, size in stored},
        )
