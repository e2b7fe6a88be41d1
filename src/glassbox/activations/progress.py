"""The progress bar of an extraction: documents done, tokens/s, rows stored, ETA, on stderr.

Offers:
    Progress(enabled, total=None, done=0)   ``enabled=None``: on when stderr is a terminal
    .update(documents, tokens, rows)                  after each shard
    .close()

It uses tqdm (installed with transformers, not a glassbox dependency), else a plain line
rewritten in place. The ETA counts documents, the only total known before the run; tokens/s is
measured over this run only (a resumed run does not count what an earlier one did).
"""

from __future__ import annotations

import sys
import time
from typing import Any


class Progress:
    """A bar that is a no-op when disabled."""

    def __init__(self, enabled: bool | None, total: int | None = None, done: int = 0) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else bool(enabled)
        self.started = time.perf_counter()
        self.tokens = 0
        self.bar: Any = None
        self._plain_last = 0.0
        self.total, self.done = total, done
        if not self.enabled:
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return
        self.bar = tqdm(total=total, initial=done, unit="doc", desc="extract", file=sys.stderr,
                        dynamic_ncols=True, smoothing=0.1)

    def update(self, documents: int, tokens: int, rows: int) -> None:
        if not self.enabled:
            return
        self.tokens += tokens
        self.done += documents
        rate = self.tokens / max(time.perf_counter() - self.started, 1e-9)
        text = f"{rate:,.0f} tok/s, {rows:,} rows"
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(documents)
            return
        now = time.perf_counter()
        if now - self._plain_last >= 0.5 or (self.total is not None and self.done >= self.total):
            self._plain_last = now
            of = f"/{self.total:,}" if self.total is not None else ""
            sys.stderr.write(f"\rextract: {self.done:,}{of} docs, {text}")
            sys.stderr.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()
