"""docs/models.md: every python block runs, in order, in one namespace (tiny models, offline)."""

from __future__ import annotations

import linecache
import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "models.md"


def test_docs_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 6
    namespace: dict = {"__name__": "models_md"}
    for number, source in enumerate(blocks):
        filename = f"<docs/models.md block {number}>"
        # registered so that deferred invoke blocks find their source, as they would in a file
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        exec(compile(source, filename, "exec"), namespace)  # the documented examples
    assert namespace["lora"].model.layers[0].self_attn.q_proj.lora_A.default._module.weight.shape == (4, 64)
