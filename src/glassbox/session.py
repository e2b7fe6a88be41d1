"""``with model.session():`` — several traces as one unit of work.

Offers:
    Session   locally a plain grouping (traces run as they are reached and
              values flow between them as ordinary variables); a remote
              session ships all its traces as one job.
"""

from __future__ import annotations

from typing import Any


class Session:
    """Group traces; variables flow between them.

        with model.session():
            with model.trace(x1):
                h = model[0].output.save()
            with model.trace(x2):
                model[0].output[:] = h
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self.traces = 0

    def __enter__(self) -> Session:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        return False
