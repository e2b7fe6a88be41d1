"""What other glassbox modules plug into envoy.py, which cannot import them (they import it).

Offers:
    SavableTuple            a tuple that has ``.save()`` (module outputs are often tuples)
    savable(value)          ``value`` as a SavableTuple if it is a plain tuple, else itself
    set_save(fn)            glassbox.tracing: what ``SavableTuple.save`` calls
    set_source_factory(fn)  glassbox.source: what builds ``envoy.source``
    set_tracer_finder(fn)   glassbox.tracing: the current trace (the deprecated ``model.iter``)
    set_root_class(cls)     glassbox.models.base: what ``Envoy(module)`` builds (NNsight)
    PLUGGED                 what was registered, by those names (read at call time)

Each registers on import (glassbox/__init__ imports them all), so every dependency runs one way:
tracing, source and models.base import envoy, never the reverse. Tuples to save come from a
trace, which tracing opens, so ``save`` is registered by the time one is saved. envoy.py
re-exports these names, so ``from glassbox.envoy import SavableTuple`` keeps working.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

PLUGGED: dict[str, Any] = {"save": None, "source": None, "tracer": None, "root": None}


def set_save(save: Callable[[Any], Any]) -> None:
    """Register what ``SavableTuple.save`` calls (glassbox.tracing does, on import)."""
    PLUGGED["save"] = save


def set_source_factory(factory: Callable[[Any], Any]) -> None:
    """Register what builds ``envoy.source`` (glassbox.source does, on import)."""
    PLUGGED["source"] = factory


def set_tracer_finder(finder: Callable[[], Any]) -> None:
    """Register what finds the current trace (glassbox.tracing does, on import)."""
    PLUGGED["tracer"] = finder


def set_root_class(cls: type) -> None:
    """Register the class ``Envoy(module)`` builds (glassbox.models.base does: NNsight)."""
    PLUGGED["root"] = cls


class SavableTuple(tuple):
    """A tuple that also has ``.save()`` (module outputs are often tuples)."""

    def save(self) -> SavableTuple:
        save = PLUGGED["save"]
        assert save is not None, "glassbox.tracing registers it on import"
        return save(self)


def savable(value: Any) -> Any:
    return SavableTuple(value) if type(value) is tuple else value
