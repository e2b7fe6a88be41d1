"""``with model.session():`` — several traces as one unit of work.

Offers:
    Session   locally a plain grouping (traces run as they are reached and
              values flow between them as ordinary variables); with
              ``remote=True`` the whole block, all its traces, is one job on
              the server, and the values saved in it come back.
"""

from __future__ import annotations

import sys
from typing import Any

from .capture import capture_body
from .tracing import enter_session, exit_session, remote_where


class Session:
    """Group traces; variables flow between them.

        with model.session():
            with model.trace(x1):
                h = model[0].output.save()
            with model.trace(x2):
                model[0].output[:] = h
    """

    def __init__(self, model: Any, remote: bool | str = False, timeout: float | None = None,
                 blocking: bool = True) -> None:
        self.model = model
        self.remote = remote
        self.timeout = timeout
        self.blocking = blocking
        self.job: Any = None
        self._run: Any = None

    def __enter__(self) -> Session:
        if self.remote:
            frame = sys._getframe(1)
            self._run = self.model._run_remotely(
                "session", capture_body(frame, "session"), frame, [], {},
                timeout=self.timeout, blocking=self.blocking, **remote_where(self.remote),
            ).enter()
        else:
            enter_session()
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        if self._run is None:
            exit_session()
            return False
        run, self._run = self._run, None
        swallowed = run.exit(exc_type)
        self.job = run.job
        return swallowed
