"""What one extraction computes, checked once before any forward pass.

Offers:
    Plan.build(model, modules=, positions=, max_length=, batch_tokens=, dtype=, project=,
               pool=, topk=, text_field=)       validates every argument of ``extract``
    plan.paths                                  module paths, in the order the model's forward returns
                                                from them (children before parents; order.py)
    plan.select(ids) -> list[int]               the positions kept of one document
    plan.settings(model, source) -> dict        what the index records; a resumed run must match
    plan.names() -> list[str]                   the tensor names each shard holds

Reductions, in the order the trace block applies them to each module's output
``[batch, seq, hidden]``: position selection (padding is never selected) -> pooling over a
document's selected positions (``pool="mean" | "max"``: one row per document) -> projection onto
``project`` (``[hidden, k]``) -> top-k over the last dimension (values under the module's path,
indices under ``path + ":indices"``) -> cast to ``dtype``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .order import run_order

DOCUMENT, POSITION = "document", "position"  # per-row bookkeeping tensors stored in every shard
INDICES = ":indices"  # suffix of the top-k indices tensor (module paths never contain ':')
_POOLS = ("mean", "max")
_NAMED_POSITIONS = ("all", "last")


@dataclass
class Plan:
    """The checked arguments of one ``extract`` call."""

    paths: list[str]
    positions: Any
    max_length: int
    batch_tokens: int
    dtype: torch.dtype | None
    project: dict[str, torch.Tensor] | None
    pool: str | None
    topk: int | None
    text_field: str = "text"

    @classmethod
    def build(cls, model: Any, *, modules: Any, positions: Any = "all", max_length: int = 512,
              batch_tokens: int = 8192, dtype: Any = None, project: Any = None, pool: str | None = None,
              topk: int | None = None, text_field: str = "text") -> Plan:
        paths = _module_paths(model, modules)
        for name, value in (("max_length", max_length), ("batch_tokens", batch_tokens)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if max_length > batch_tokens:
            raise ValueError(f"max_length={max_length} is more than batch_tokens={batch_tokens}: one "
                             "document must fit in a batch")
        _check_positions(positions)
        if pool is not None and pool not in _POOLS:
            raise ValueError(f"pool must be None, 'mean' or 'max', got {pool!r}")
        if topk is not None and (not isinstance(topk, int) or isinstance(topk, bool) or topk < 1):
            raise ValueError(f"topk must be None or a positive int, got {topk!r}")
        projections = _projections(model, project, paths)
        # last, as it runs the model (a scan: no compute): every cheap check has passed. The
        # block reads the modules in this order, so it must be the order the forward returns
        # from them (children before their parent), or the trace raises OutOfOrderError.
        paths = run_order(model, paths)
        return cls(paths, positions, max_length, batch_tokens, _dtype(dtype), projections, pool, topk,
                   text_field)

    # ---------------------------------------------------------------- per document

    def select(self, ids: list[int], document: int = 0) -> list[int]:
        """Positions of ``ids`` (one document, no padding) whose activations are kept."""
        n, chosen = len(ids), self.positions
        if n == 0:
            return []
        if chosen == "all":
            return list(range(n))
        if chosen == "last":
            return [n - 1]
        if isinstance(chosen, slice):
            return list(range(n)[chosen])
        if isinstance(chosen, int):
            return [chosen % n] if -n <= chosen < n else []
        if isinstance(chosen, (list, tuple)):
            return [p % n for p in chosen if -n <= p < n]
        picked = chosen(list(ids))  # a callable: runs here, on the client, also for remote=True
        out = []
        for p in picked:
            if isinstance(p, torch.Tensor):
                p = p.item()
            if not isinstance(p, int) or isinstance(p, bool) or not -n <= p < n:
                raise ValueError(f"positions callable returned {p!r} for document {document}, which has "
                                 f"{n} tokens: return ints in range({n}) (or negative ones from the end)")
            out.append(p % n)
        return out

    # ---------------------------------------------------------------- the index

    def settings(self, model: Any, source: Any) -> dict:
        """What the output holds, as the index records it. A run resuming into the same folder
        must have equal settings (batching is not part of them: it changes shard sizes, not values)."""
        return {
            "model": model._remote_name(),
            "source": source.describe(),
            "text_field": self.text_field,
            "modules": list(self.paths),
            "positions": _describe_positions(self.positions),
            "max_length": self.max_length,
            "dtype": None if self.dtype is None else str(self.dtype).removeprefix("torch."),
            "pool": self.pool,
            "project": None if self.project is None else {
                path: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
                       "sha256": _digest(t)} for path, t in self.project.items()},
            "topk": self.topk,
        }

    def names(self) -> list[str]:
        """Tensor names in each shard, besides ``document`` and ``position``."""
        return [n for path in self.paths for n in ((path, path + INDICES) if self.topk else (path,))]


# ---------------------------------------------------------------- checks


def _module_paths(model: Any, modules: Any) -> list[str]:
    from ..envoy import Envoy, display_of, path_of, root_of

    if isinstance(modules, (Envoy, str)):
        modules = [modules]
    if not isinstance(modules, (list, tuple)) or not modules:
        raise TypeError("modules must be a non-empty list of modules (model.model.layers[5], ...) or "
                        "their dotted paths ('model.layers.5')")
    known = {path_of(envoy) for envoy in model.modules()}
    paths = []
    for module in modules:
        if isinstance(module, Envoy):
            if root_of(module) is not model:
                raise ValueError(f"{display_of(module)} belongs to another model than the one extracted from")
            path = path_of(module)
        elif isinstance(module, str):
            path = module
        else:
            raise TypeError(f"modules: cannot use {type(module).__name__}; give model.<path> or 'a.b.0'")
        if path == "":
            raise ValueError("modules: the whole model's output is not an activation; pick submodules "
                             "(e.g. model.model.layers[5])")
        if path not in known:
            raise ValueError(f"modules: the model has no submodule {path!r}")
        if path in paths:
            raise ValueError(f"modules: {path!r} is listed twice")
        paths.append(path)
    return paths


def _check_positions(positions: Any) -> None:
    if isinstance(positions, str):
        if positions not in _NAMED_POSITIONS:
            raise ValueError(f"positions must be 'all', 'last', an int, a slice, a list of ints or a "
                             f"callable, got {positions!r}")
    elif isinstance(positions, (list, tuple)):
        if not positions or not all(isinstance(p, int) and not isinstance(p, bool) for p in positions):
            raise ValueError(f"a positions list must hold ints, got {positions!r}")
    elif isinstance(positions, bool) or not (isinstance(positions, (int, slice)) or callable(positions)):
        raise ValueError(f"positions must be 'all', 'last', an int, a slice, a list of ints or a "
                         f"callable ids -> positions, got {positions!r}")


def _describe_positions(positions: Any) -> Any:
    if isinstance(positions, (str, int)):
        return positions
    if isinstance(positions, slice):
        return {"slice": [positions.start, positions.stop, positions.step]}
    if isinstance(positions, (list, tuple)):
        return list(positions)
    fn: Callable = positions
    return {"callable": f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"}


def _dtype(dtype: Any) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, dtype, None) if isinstance(dtype, str) else None
    if not isinstance(value, torch.dtype):
        raise ValueError(f"dtype must be None (the model's), a torch.dtype or its name like 'bfloat16', "
                         f"got {dtype!r}")
    return value


def _projections(model: Any, project: Any, paths: list[str]) -> dict[str, torch.Tensor] | None:
    from ..envoy import Envoy, path_of

    if project is None:
        return None
    if isinstance(project, torch.Tensor):
        project = {path: project for path in paths}
    if not isinstance(project, dict):
        raise TypeError("project must be a tensor [hidden, k] or a dict {module: tensor}")
    out = {}
    for key, tensor in project.items():
        path = path_of(key) if isinstance(key, Envoy) else key
        if path not in paths:
            raise ValueError(f"project: {path!r} is not one of the extracted modules {paths}")
        if not isinstance(tensor, torch.Tensor) or tensor.ndim != 2 or not tensor.is_floating_point():
            raise ValueError(f"project[{path!r}] must be a 2-D float tensor [hidden, k]")
        out[path] = tensor.detach().cpu().contiguous()
    missing = [p for p in paths if p not in out]
    if missing:
        raise ValueError(f"project has no tensor for {missing}: give one per module, or one tensor for all")
    return out


def _digest(tensor: torch.Tensor) -> str:
    raw = tensor.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(raw).hexdigest()
