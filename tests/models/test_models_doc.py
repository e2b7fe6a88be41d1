"""docs/models.md: every python block runs, in order, in one namespace (tiny models, offline)."""

from __future__ import annotations

from pathlib import Path

from tests.doc_blocks import run_python_blocks

DOC = Path(__file__).resolve().parents[2] / "docs" / "models.md"


def test_docs_examples_run():
    namespace = run_python_blocks(DOC, least=6)
    assert namespace["lora"].model.layers[0].self_attn.q_proj.lora_A.default._module.weight.shape == (4, 64)
