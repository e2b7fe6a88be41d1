"""Run a markdown file's examples: every ```python block, in order, in one namespace.

Offers:
    python_blocks(path)                       the blocks' sources
    run_python_blocks(path, namespace, least) run them (``least``: how many there must be, so a
                                              file whose examples were lost fails); returns the
                                              namespace, for the caller's assertions
Each block is registered in ``linecache`` under ``<name block N>``, so deferred invoke and edit
blocks find their source as they would in a file.
"""

from __future__ import annotations

import linecache
import re
from pathlib import Path


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def run_python_blocks(path: Path, namespace: dict | None = None, least: int = 1) -> dict:
    blocks = python_blocks(path)
    assert len(blocks) >= least, f"{path.name} has {len(blocks)} python examples, expected {least} or more"
    namespace = {"__name__": path.stem} if namespace is None else namespace
    for number, source in enumerate(blocks):
        filename = f"<{path.name} block {number}>"
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        exec(compile(source, filename, "exec"), namespace)  # the documented examples
    return namespace
