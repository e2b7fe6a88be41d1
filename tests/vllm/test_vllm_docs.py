"""Every ```python block of docs/vllm.md runs, in order, in one namespace (on a fresh engine)."""

from __future__ import annotations

import linecache
import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "vllm.md"


def test_docs_examples_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 3
    namespace: dict = {"__name__": "docs_vllm"}
    for number, source in enumerate(blocks):
        filename = f"<docs/vllm.md block {number}>"
        # registered so that deferred invoke blocks find their source, as they would in a file
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        exec(compile(source, filename, "exec"), namespace)  # the documented examples
    # vLLM logs to stdout too: keep the examples' own lines
    printed = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("(")]
    assert printed[0].startswith("Paris") and printed[0].endswith("True")
    assert printed[1] == "torch.Size([9, 576])"
    assert namespace["steered"].token_ids != namespace["other"].token_ids
    assert len(namespace["other"].token_ids) == 2
    assert "Rome" in printed[-1]
