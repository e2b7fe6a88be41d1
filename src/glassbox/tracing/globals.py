"""The block tracer's process-wide caches (nnsight 0.8's ``nnsight.tracing.globals``).

Offers:
    SOURCES   filename -> source text, read once (a file edited while the process runs is
              still traced as first read, so a block's code never changes under a loop)
    BLOCKS    (filename, line, code name, code's first line) -> (the ``with`` node, its compiled
              body), or (None, None) for a call site that is not a ``with`` block (that verdict
              is kept too, so a wrong call site is not parsed again)

Both grow with the program's own distinct trace sites, so they are never evicted.
"""

from __future__ import annotations

import ast
from types import CodeType

SOURCES: dict[str, str] = {}
BLOCKS: dict[tuple[str, int, str, int], tuple[ast.AST | None, CodeType | None]] = {}
