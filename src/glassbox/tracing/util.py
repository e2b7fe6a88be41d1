"""Tracebacks without glassbox's frames (nnsight 0.8's ``nnsight.tracing.util``).

Offers:
    filter_traceback(tb, keep)  a new chain of the entries whose frame ``keep(frame)`` accepts;
                                None when it accepts none
    clean_traceback(tb)         ``tb`` without glassbox's own frames, so it ends at the user's
                                lines (any file outside the glassbox package is the user's);
                                whole when ``CONFIG.APP.DEBUG`` is on
"""

from __future__ import annotations

from types import TracebackType

from ..config import CONFIG
from ..errors import filter_traceback, user_frames

__all__ = ["clean_traceback", "filter_traceback"]


def clean_traceback(tb: TracebackType | None) -> TracebackType | None:
    if CONFIG.APP.DEBUG:
        return tb
    return user_frames(tb)
