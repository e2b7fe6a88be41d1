"""Every ```python block of the README runs, in order, in one namespace."""

from __future__ import annotations

import linecache
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(_blocks()) >= 7


def test_readme_examples_run(capsys):
    namespace: dict = {"__name__": "readme"}
    for number, source in enumerate(_blocks()):
        filename = f"<README.md block {number}>"
        # register the source so deferred invoke blocks find it, as they would in a file
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        exec(compile(source, filename, "exec"), namespace)  # the documented examples
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
