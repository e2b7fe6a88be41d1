"""Every ```python block of the README runs, in order, in one namespace."""

from __future__ import annotations

from pathlib import Path

from tests.doc_blocks import run_python_blocks

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_examples_run(capsys):
    run_python_blocks(README, {"__name__": "readme"}, least=7)
    printed = capsys.readouterr().out
    assert "Sequential" in printed and "capital of France" in printed


def test_every_server_flag_is_in_the_operators_table():
    from glassbox.cli import _REPEATED
    from glassbox.server.config import ServerConfig

    text = README.read_text()
    for field in ServerConfig.fields():
        if not field.metadata.get("cli", True):
            continue  # set by the catalog, not a flag
        flag = _REPEATED[field.name][0] if field.name in _REPEATED else "--" + field.name.replace("_", "-")
        assert f"| `{flag}` |" in text, f"{flag} is missing from the README's table of server flags"
