"""What ``print(envoy.source)`` and ``repr`` of one operation show.

Offers:
    listing(compiled, title)        the forward's source with each line's op names beside it, nnsight
                                    0.8's layout: the ``def`` line marked ``*``, the lines after it
                                    numbered from 0, a second op on one line as ``+ ...``
    describe(compiled, name, where) one op: where it is and its line, with a little context

Neither shows a file path: only the function's qualified name and line numbers within it.
"""

from __future__ import annotations

from .rewrite import Compiled


def listing(compiled: Compiled, title: str) -> str:
    names = compiled.names
    by_line: dict[int, list[str]] = {}
    for name in names:
        by_line.setdefault(compiled.lines[name], []).append(name)
    width = max((len(name) for name in names), default=0)
    on_def = by_line.get(0, [])  # a one-line def: its ops are on the ``*`` line
    first = f" {on_def[0]:{width}} ->" if on_def else " " * (width + 4)
    out = [f"{title} ({compiled.qualname}):", f"{first}   *  {compiled.text[0]}"]
    out.extend(f" {name:{width}} ->   +  ..." for name in on_def[1:])
    for index, line in enumerate(compiled.text[1:]):
        here = by_line.get(index + 1)
        if not here:
            out.append(" " * (width + 4) + f"{index:4d}  {line}")
            continue
        out.append(f" {here[0]:{width}} ->{index:4d}  {line}")
        indent = " " * (len(line) - len(line.lstrip()))
        out.extend(f" {name:{width}} ->   +  {indent}..." for name in here[1:])
    return "\n".join(out)


def describe(compiled: Compiled, name: str, where: str) -> str:
    """``where`` (the op's path), the line it is on (numbered as in the listing) and two lines each side."""
    at = compiled.lines[name]
    text = compiled.text
    line = "the def line" if at == 0 else f"line {at - 1}"
    out = [f"{where}: {line} of {compiled.qualname}"]
    for index in range(max(0, at - 2), min(len(text), at + 3)):
        mark = "-->" if index == at else "   "
        number = "   *" if index == 0 else f"{index - 1:4d}"
        out.append(f"  {mark}{number}  {text[index]}")
    return "\n".join(out)
