"""``tracer.cache(...)``: record module outputs (and inputs) as the model runs.

Offers:
    Cache        dict from module path (``"model.layers.0"``) to CacheEntry, filled as the
                 model runs; also navigable like the model: ``cache.model.layers[0]`` or the
                 short ``cache.layers[0]`` (indices and ``rename=`` aliases resolve through the
                 model's envoy tree while it is attached; by path always).
    CacheEntry   the visits of one module, in order (a list of Entry): ``.output`` / ``.inputs``
                 / ``.input`` are the value of the only visit, or a list with one per visit
                 (generation steps, modules called several times) as in nnsight; ``.outputs`` /
                 ``.all_inputs`` are always lists.
    Entry        one visit: ``.output``, ``.inputs`` (``None`` when inputs were not cached),
                 ``.input``.

Options (as nnsight 0.8's ``tracer.cache``): ``modules`` (envoys or paths; default every
module), ``device`` (default CPU; ``None`` leaves values where they are), ``dtype`` (floating
tensors cast), ``detach`` (default True), ``include_output`` (default True),
``include_inputs`` (default False). Values are recorded after the trace's edits at that
boundary: the cache holds what the model used. Tensors are converted, not copied: ``to`` on a
tensor already on that device and dtype returns the same storage.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._pytree import tree_map

from .envoy import path_of
from .errors import TraceStateError


class Entry:
    """One visit of a module: its output and, if cached, its inputs ``(args, kwargs)``."""

    __slots__ = ("inputs", "output")

    def __init__(self, output: Any = None, inputs: tuple[tuple, dict] | None = None) -> None:
        self.output = output
        self.inputs = inputs

    @property
    def input(self) -> Any:
        """The first input: the first positional argument, else the first keyword one."""
        if self.inputs is None:
            return None
        args, kwargs = self.inputs
        return args[0] if args else next(iter(kwargs.values()), None)

    def __repr__(self) -> str:
        return f"Entry(output={type(self.output).__name__}, inputs={'yes' if self.inputs else 'no'})"


class CacheEntry(list):
    """The visits of one module (a list of Entry)."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def _one_or_all(self, values: list) -> Any:
        if not values:
            raise TraceStateError(f"{self.path} has not run (yet) in this trace")
        return values[0] if len(values) == 1 else values

    @property
    def output(self) -> Any:
        return self._one_or_all([e.output for e in self])

    @property
    def inputs(self) -> Any:
        return self._one_or_all([e.inputs for e in self])

    @property
    def input(self) -> Any:
        return self._one_or_all([e.input for e in self])

    @property
    def outputs(self) -> list:
        return [e.output for e in self]

    @property
    def all_inputs(self) -> list:
        return [e.inputs for e in self]

    def __repr__(self) -> str:
        return f"CacheEntry({self.path!r}, calls={len(self)})"


class Cache(dict):
    """Module path -> CacheEntry, filled while the trace runs.

        with model.trace(x) as tracer:
            cache = tracer.cache()
        cache["model.0"].output, cache.model[0].output
    """

    root: Any = None  # the model's root envoy, for navigation (None after a remote trip)

    @classmethod
    def attach(cls, interleaver: Any, root: Any, envoys: list[Any], *, device: Any = "cpu",
               dtype: torch.dtype | None = None, detach: bool = True, include_output: bool = True,
               include_inputs: bool = False) -> Cache:
        cache = cls()
        cache.root = root
        convert = _converter(device, dtype, detach)
        for envoy in envoys:
            key = cache_key(envoy)
            entry = cache[key] = CacheEntry(key)
            record = _recorder(entry, convert, include_output, include_inputs)
            interleaver.site(envoy).recorders.append(record)
        return cache

    def keys(self) -> list[str]:  # type: ignore[override]
        """The cached module paths, as a list (as nnsight 0.8's ``cache.keys()``)."""
        return list(super().keys())

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if name == "model":
            return _CacheView(self, "model", self.root)
        return _CacheView(self, "model", self.root).child(name)

    def converted(self, convert: Any) -> Cache:
        """A new Cache with ``convert`` applied to every visit's output and inputs."""
        out = Cache()
        for key, entry in self.items():
            copy = out[key] = CacheEntry(key)
            for e in entry:
                copy.append(Entry(convert(e.output), None if e.inputs is None else convert(e.inputs)))
        return out

    def __getstate__(self) -> dict:
        return {}  # the envoy tree stays behind (pickling keeps only the recorded entries)


def cache_key(envoy: Any) -> str:
    """The cache key of an envoy: ``model`` plus its module path."""
    path = path_of(envoy)
    return f"model.{path}" if path else "model"


def _converter(device: Any, dtype: torch.dtype | None, detach: bool) -> Any:
    if device is None and dtype is None and not detach:
        return None

    def convert_tensor(value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        if detach:
            value = value.detach()
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        return value if device is None else value.to(device)

    return lambda value: tree_map(convert_tensor, value)


def _recorder(entry: CacheEntry, convert: Any, include_output: bool, include_inputs: bool) -> Any:
    open_visit: list[Entry] = []  # a visit whose inputs are recorded and output not yet

    def record(kind: str, value: Any) -> None:
        if kind == "input":
            if include_inputs:
                visit = Entry(inputs=value if convert is None else convert(value))
                entry.append(visit)
                open_visit.append(visit)
            return
        if not include_output:
            if not include_inputs:
                entry.append(Entry())
            return
        value = value if convert is None else convert(value)
        if open_visit:
            open_visit.pop().output = value
        else:
            entry.append(Entry(output=value))

    return record


class _CacheView:
    """Attribute / index navigation over a Cache, mirroring the module tree."""

    def __init__(self, cache: Cache, path: str, envoy: Any) -> None:
        self._cache, self._path, self._envoy = cache, path, envoy

    def child(self, name: str) -> _CacheView:
        if self._envoy is not None:  # the model's tree: indices and aliases as on the model
            try:
                envoy = self._envoy.get(name)
            except AttributeError:
                raise AttributeError(f"{self._path} has no submodule {name!r}") from None
            return _CacheView(self._cache, cache_key(envoy), envoy)
        path = f"{self._path}.{name}"
        if path not in self._cache and not any(k.startswith(path + ".") for k in self._cache):
            raise AttributeError(f"nothing cached under {path}")
        return _CacheView(self._cache, path, None)

    def _entry(self) -> CacheEntry:
        if self._path not in self._cache:
            raise KeyError(f"{self._path!r} was not cached; cached: {', '.join(self._cache) or 'nothing'}")
        return self._cache[self._path]

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if name in ("output", "outputs", "inputs", "input", "all_inputs"):
            return getattr(self._entry(), name)
        return self.child(name)

    def __getitem__(self, index: int | str) -> _CacheView:
        if isinstance(index, int) and self._envoy is not None:  # negative indices as on the model
            envoy = self._envoy[index]
            return _CacheView(self._cache, cache_key(envoy), envoy)
        return self.child(str(index))

    def __len__(self) -> int:
        return len(self._entry())

    def keys(self) -> list[str]:
        """The cached paths at or below this node."""
        return [k for k in self._cache if k == self._path or k.startswith(self._path + ".")]

    def __repr__(self) -> str:
        return f"CacheView({self._path!r}, cached={self.keys()})"
