"""Attributes glassbox adds to shared classes.

Offers:
    ClassPatch(cls, name, value)   .acquire() installs on first use, .release()
                                   removes on last; thread-safe (``Tensor.grad`` while a
                                   ``with loss.backward():`` block runs).
    mount(cls, name, fn)           add ``name`` to ``cls`` for the rest of the process
                                   (``Tensor.save``, ``Tensor.backward``: tracing/saving.py).
    mount_builtin(types, name, fn) the same for builtin types (list, dict, ...); False where
                                   this Python does not allow it (``list.save``: tracing/saving.py).

Nothing is mounted at import (``import glassbox`` leaves builtins, torch and transformers as they
were: tests/test_import_clean.py). ``Tensor.save``, ``Tensor.backward`` and ``save`` on list,
dict, set and tuple are mounted at the first trace (or session: ``tracing.saving.ensure_mounted``) and
stay: writing an attribute of ``torch.Tensor`` (or of a builtin, through its dict plus
``PyType_Modified``) invalidates the interpreter's cached lookups of every method of the class and
its subclasses, which made each trace pay for it again. So ``[].save()`` is an AttributeError
before the first trace; after it, outside a trace, ``.save()`` raises an error that says what to
do instead, and ``backward`` is torch's own (nnsight 0.8 mounts ``save`` on every object).
"""

from __future__ import annotations

import ctypes
import gc
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


def mount(cls: type, name: str, fn: Any) -> None:
    """Give ``cls`` the attribute ``name`` for the rest of the process (``Tensor.save``)."""
    with _lock:
        if cls.__dict__.get(name) is not fn:
            setattr(cls, name, fn)


def mount_builtin(types: tuple[type, ...], name: str, fn: Any) -> bool:
    """Give every type of ``types`` the method ``name`` (where it has none). Returns
    whether all of them have it now; a Python that hides a type's dict gives False."""
    try:
        modified = ctypes.pythonapi.PyType_Modified
        modified.argtypes = [ctypes.py_object]
        for cls in types:
            if name in cls.__dict__:
                continue
            namespaces = [r for r in gc.get_referents(cls.__dict__) if isinstance(r, dict)]
            if len(namespaces) != 1:
                return False
            namespaces[0][name] = fn
            modified(cls)  # drop the interpreter's cached lookups of `name` on cls and subclasses
        return all(getattr(cls, name, None) is fn for cls in types)
    except (AttributeError, TypeError, ValueError, OSError):
        return False
