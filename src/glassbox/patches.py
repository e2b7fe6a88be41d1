"""Temporary, reference-counted attributes on shared classes.

Offers:
    ClassPatch(cls, name, value)   .acquire() installs on first use, .release()
                                   removes on last; thread-safe.

glassbox adds ``Tensor.save`` (and a few others) only while at least one trace
is open anywhere in the process, so that outside a trace torch is untouched.
Several threads may trace at once, hence the count.
"""

from __future__ import annotations

import threading
from typing import Any

_MISSING = object()
_lock = threading.Lock()


class ClassPatch:
    """Install ``cls.name = value`` while at least one user holds it.

        patch = ClassPatch(torch.Tensor, "save", save_method)
        patch.acquire(); torch.ones(1).save(); patch.release()
    """

    def __init__(self, cls: type, name: str, value: Any) -> None:
        self.cls = cls
        self.name = name
        self.value = value
        self._count = 0
        self._previous: Any = _MISSING

    def acquire(self) -> None:
        with _lock:
            if self._count == 0:
                self._previous = self.cls.__dict__.get(self.name, _MISSING)
                setattr(self.cls, self.name, self.value)
            self._count += 1

    def release(self) -> None:
        with _lock:
            self._count -= 1
            if self._count == 0:
                if self._previous is _MISSING:
                    delattr(self.cls, self.name)
                else:
                    setattr(self.cls, self.name, self._previous)
                self._previous = _MISSING

    @property
    def active(self) -> bool:
        return self._count > 0


class PatchSet:
    """Acquire/release several ClassPatch objects together."""

    def __init__(self, patches: list[ClassPatch]) -> None:
        self.patches = patches

    def acquire(self) -> None:
        for p in self.patches:
            p.acquire()

    def release(self) -> None:
        for p in reversed(self.patches):
            p.release()
