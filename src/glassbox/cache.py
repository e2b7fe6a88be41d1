"""``tracer.cache(...)``: record module outputs (and inputs) as the model runs.

Offers:
    Cache        dict from module path (``"model.layers.0"``) to CacheEntry;
                 also navigable like the model: ``cache.model.layers[0].output``.
    CacheEntry   ``.output`` / ``.inputs`` of the first call, ``.outputs`` /
                 ``.all_inputs`` of every call (generation steps, reused modules).
"""

from __future__ import annotations

from typing import Any

from .errors import TraceStateError


class CacheEntry:
    """What one module produced during the trace."""

    __slots__ = ("all_inputs", "outputs", "path")

    def __init__(self, path: str) -> None:
        self.path = path
        self.outputs: list[Any] = []
        self.all_inputs: list[tuple[tuple, dict]] = []

    @property
    def output(self) -> Any:
        if not self.outputs:
            raise TraceStateError(f"{self.path} has not run (yet) in this trace")
        return self.outputs[0]

    @property
    def inputs(self) -> tuple[tuple, dict]:
        if not self.all_inputs:
            raise TraceStateError(
                f"no inputs recorded for {self.path}: pass include_inputs=True to tracer.cache()"
            )
        return self.all_inputs[0]

    @property
    def input(self) -> Any:
        args, kwargs = self.inputs
        return args[0] if args else next(iter(kwargs.values()), None)

    def __repr__(self) -> str:
        return f"CacheEntry({self.path!r}, calls={len(self.outputs)})"


class Cache(dict):
    """Module path -> CacheEntry, filled while the trace runs.

        with model.trace(x) as tracer:
            cache = tracer.cache()
        cache["model.0"].output, cache.model[0].output
    """

    @classmethod
    def attach(cls, interleaver: Any, envoys: list[Any], include_inputs: bool) -> Cache:
        cache = cls()
        for envoy in envoys:
            key = "model" + (f".{envoy._path}" if envoy._path else "")
            entry = cache[key] = CacheEntry(key)
            site = interleaver.site(envoy)
            site.recorders.append(_recorder(entry, include_inputs))
        return cache

    def __getattr__(self, name: str) -> Any:
        if name == "model" and "model" in self:
            return _CacheView(self, "model")
        raise AttributeError(name)


def _recorder(entry: CacheEntry, include_inputs: bool) -> Any:
    def record(kind: str, value: Any) -> None:
        if kind == "output":
            entry.outputs.append(value)
        elif include_inputs:
            entry.all_inputs.append(value)

    return record


class _CacheView:
    """Attribute/index navigation over a Cache, mirroring the module tree."""

    def __init__(self, cache: Cache, path: str) -> None:
        self._cache = cache
        self._path = path

    def _child(self, name: str) -> _CacheView:
        path = f"{self._path}.{name}"
        if path not in self._cache and not any(k.startswith(path + ".") for k in self._cache):
            raise AttributeError(f"nothing cached under {path}")
        return _CacheView(self._cache, path)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if name in ("output", "outputs", "inputs", "input", "all_inputs"):
            return getattr(self._cache[self._path], name)
        return self._child(name)

    def __getitem__(self, index: int) -> _CacheView:
        return self._child(str(index))
