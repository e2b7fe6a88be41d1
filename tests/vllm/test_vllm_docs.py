"""Every ```python block of docs/vllm.md runs, in order, in one namespace (on a fresh engine)."""

from __future__ import annotations

from pathlib import Path

from tests.doc_blocks import run_python_blocks

DOC = Path(__file__).resolve().parents[2] / "docs" / "vllm.md"


def test_docs_examples_run(capsys):
    namespace = run_python_blocks(DOC, least=3)
    # vLLM logs to stdout too: keep the examples' own lines
    printed = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("(")]
    assert printed[0].startswith("Paris") and printed[0].endswith("True")
    assert printed[1] == "torch.Size([9, 576])"
    assert namespace["steered"].token_ids != namespace["other"].token_ids
    assert len(namespace["other"].token_ids) == 2
    assert "Rome" in printed[-1]
