"""The warnings a job's block raised, carried back to the client (which raises them again there).

Offers:
    captured(filename) -> list[JobWarning]   a context manager: the list is filled when it exits

Which warnings travel: those whose location is a line of the job's own block (``filename``, the
name its code was compiled under): what the user's code warned, and what glassbox or torch warned
about one of the user's lines (``tracer.iter`` "was never reached", a deprecated spelling,
``torch.tensor(a_tensor)``), as a local run shows them; one that the sandbox's guards stand
between goes to the block's line that made the call. A warning located in a library
(transformers, torch) does not travel: its location is a server path, and it says something
about the server's code, not the user's. Each location travels once (Python's "default"
action), at most ``MAX_WARNINGS`` of them, messages cut
to ``MAX_WARNING_CHARS`` with server paths hidden; they are part of the result, so
``max_result_bytes`` and the key's quota count them (workers/output.py).

``warnings.catch_warnings`` is process-wide: it is used where a process runs one job at a time (a
job's or a body's own process; a ``--isolation none`` worker, which runs its jobs one by one).
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Iterator
from typing import Any

from ...remote.job import MAX_WARNING_CHARS, MAX_WARNINGS, JobWarning
from .. import sandbox
from .server_paths import without_server_paths

__all__ = ["captured"]

_CUT = " [... cut]"
_SANDBOX = os.path.dirname(os.path.abspath(sandbox.__file__)) + os.sep


@contextlib.contextmanager
def captured(filename: str) -> Iterator[list[JobWarning]]:
    """Record the warnings raised inside the block at ``filename``'s lines (see the docstring)."""
    found: list[JobWarning] = []
    seen: set[tuple[str, str, int]] = set()

    def show(message: Any, category: type[Warning], where: str, lineno: int, *_: Any) -> None:
        if where != filename:
            # The sandbox's guards call what the block calls (an attribute, a function), so a
            # warning meant for the caller's line (stacklevel, or torch's own from C++) lands in
            # the guard's file: it belongs to the block's innermost line below it. A local run
            # has no guard in between.
            if not where.startswith(_SANDBOX):
                return
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename != filename:
                frame = frame.f_back
            if frame is None:
                return
            lineno = frame.f_lineno
        text = without_server_paths(str(message))
        if len(text) > MAX_WARNING_CHARS:
            text = text[:MAX_WARNING_CHARS - len(_CUT)] + _CUT
        key = (category.__name__, text, lineno)
        if key not in seen and len(found) < MAX_WARNINGS:  # each location once, as Python's default
            seen.add(key)
            found.append(JobWarning(category.__name__, text, lineno))

    with warnings.catch_warnings():  # puts back the filters and showwarning when it ends
        # "always", not "default": the default action remembers a location in the registry of the
        # module the warning is located in (the guard's, shared by every line that calls through
        # it); the once-per-location rule is kept above, on the block's own lines.
        warnings.simplefilter("always")
        warnings.showwarning = show
        yield found
