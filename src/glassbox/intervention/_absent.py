"""Stand-ins for nnsight internals that glassbox has no counterpart for.

Offers:
    absent(module, name, why, base=object)
        a class named ``name`` that can be imported from nnsight's path ``module`` (so a ported
        file whose other imports are real still loads) and cannot be used: calling it, or
        reading any attribute of it, raises NotImplementedError with ``why`` (what glassbox
        does instead). ``base=Exception`` for an exception class, so that an ``except`` clause
        naming it stays valid Python; glassbox never raises it.

Nothing here pretends to work: a stand-in has no behaviour, only its message.
"""

from __future__ import annotations

from typing import Any


class _Absent(type):
    """The metaclass of a stand-in: every use of the class raises its message."""

    _why: str

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(cls._why)

    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):  # introspection (pytest, inspect, pickle)
            raise AttributeError(name)
        raise NotImplementedError(cls._why)


def absent(module: str, name: str, why: str, base: type = object) -> type:
    """A stand-in for nnsight's ``{module}.{name}`` (with ``glassbox`` for ``nnsight``)."""
    where = module.replace("glassbox", "nnsight", 1)
    message = f"{where}.{name} has no glassbox counterpart: {why}"
    return _Absent(name, (base,), {"__module__": module, "__qualname__": name, "__doc__": message,
                                   "_why": message})
