"""Reading an extraction: rows by number, or whole columns memory-mapped over every shard.

Offers:
    ActivationDataset(out)        the folder ``extract`` wrote (complete or not: what the index names)
        len(ds), ds.names         rows stored; the activation tensors' names (module paths)
        ds[i] -> Row              ``Row(activations={name: tensor}, document, position)``;
                                  a slice gives stacked tensors
        ds.torch(name=None)       a ShardedArray of torch tensors (all names in a dict when None)
        ds.numpy(name=None)       the same as numpy arrays (bfloat16 has no numpy type: use torch)
        ds.index / ds.settings / ds.complete
    ShardedArray                  one tensor name across all shards, without copying them in:
                                  ``len``, ``.shape``, ``.dtype``, ``[i]``, ``[a:b]``, ``[[i, j, ...]]``
                                  (each gathers only the rows asked for), ``.shards`` (per-shard maps)

Each shard is mapped with ``numpy.memmap`` at the offsets its safetensors header gives (the format
is a JSON header and raw little-endian data), so nothing is read until it is indexed and the page
cache, not the process, holds the data. Maps are copy-on-write: writing to a returned array never
changes the files.
"""

from __future__ import annotations

import bisect
import json
import struct
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from .plan import DOCUMENT, INDICES, POSITION
from .writer import FORMAT, INDEX

# safetensors dtype -> (numpy dtype to map, torch dtype to view it as)
_DTYPES = {
    "F64": (np.float64, torch.float64), "F32": (np.float32, torch.float32),
    "F16": (np.float16, torch.float16), "BF16": (np.uint16, torch.bfloat16),
    "I64": (np.int64, torch.int64), "I32": (np.int32, torch.int32), "I16": (np.int16, torch.int16),
    "I8": (np.int8, torch.int8), "U8": (np.uint8, torch.uint8), "BOOL": (np.bool_, torch.bool),
}


class Row(NamedTuple):
    """One stored row: ``activations`` by module path, and where it came from."""

    activations: dict[str, torch.Tensor]
    document: Any  # int for one row, a tensor for a slice
    position: Any  # -1 for a row pooled over positions


class ActivationDataset:
    """The rows an extraction stored.

        ds = ActivationDataset("acts/")
        acts, document, position = ds[0]
        layer5 = ds.torch("model.layers.5")[100:200]     # only those rows are read
    """

    def __init__(self, out: str | Path) -> None:
        self.path = Path(out)
        index_path = self.path / INDEX
        if not index_path.is_file():
            raise FileNotFoundError(f"{index_path} does not exist: not an extract() output folder")
        self.index = json.loads(index_path.read_text())
        if self.index.get("format") != FORMAT:
            raise ValueError(f"{index_path} is not a glassbox extraction index")
        self._starts = [shard["rows"][0] for shard in self.index["shards"]]
        self._maps: dict[int, dict[str, tuple[np.ndarray, torch.dtype]]] = {}

    @property
    def names(self) -> list[str]:
        stored = self.index["tensors"]  # (sorted by name there; modules run in settings order)
        return [n for path in self.settings["modules"] for n in (path, path + INDICES) if n in stored]

    @property
    def settings(self) -> dict:
        return self.index["settings"]

    @property
    def complete(self) -> bool:
        return bool(self.index["complete"])

    def __len__(self) -> int:
        return int(self.index["rows"])

    def __repr__(self) -> str:
        state = "complete" if self.complete else f"partial: {self.index['done']:,} documents done"
        return (f"ActivationDataset({str(self.path)!r}: {len(self):,} rows of {', '.join(self.names)}; "
                f"{len(self.index['shards'])} shards, {state})")

    def __getitem__(self, key: int | slice) -> Row:
        if isinstance(key, slice):
            columns = self.torch()
            rows = {name: columns[name][key] for name in self.names}
            return Row(rows, columns[DOCUMENT][key], columns[POSITION][key])
        if not isinstance(key, (int, np.integer)) or isinstance(key, bool):
            raise TypeError(f"index rows with an int or a slice, not {type(key).__name__}")
        number = int(key) + len(self) if key < 0 else int(key)
        if not 0 <= number < len(self):
            raise IndexError(f"row {key} is out of range: the dataset has {len(self)} rows")
        shard = bisect.bisect_right(self._starts, number) - 1
        local = number - self._starts[shard]
        maps = self._shard(shard)
        acts = {name: _as_torch(*maps[name])[local] for name in self.names}
        return Row(acts, int(maps[DOCUMENT][0][local]), int(maps[POSITION][0][local]))

    def torch(self, name: str | None = None) -> Any:
        """One name's rows over every shard as torch tensors (a dict of all names when None)."""
        if name is None:
            return {n: self.torch(n) for n in self.index["tensors"]}
        return ShardedArray(self, self._check(name), "torch")

    def numpy(self, name: str | None = None) -> Any:
        """One name's rows over every shard as numpy arrays (a dict of all names when None)."""
        if name is None:
            return {n: self.numpy(n) for n in self.index["tensors"]}
        if self.index["tensors"][self._check(name)]["dtype"] == "bfloat16":
            raise TypeError(f"{name} is bfloat16, which numpy has no type for: use ds.torch({name!r}), or "
                            "extract with dtype='float16' or 'float32'")
        return ShardedArray(self, name, "numpy")

    def _check(self, name: str) -> str:
        if name not in self.index["tensors"]:
            raise KeyError(f"no tensor {name!r}; this dataset has {', '.join(self.index['tensors'])}")
        return name

    def _shard(self, number: int) -> dict[str, tuple[np.ndarray, torch.dtype]]:
        maps = self._maps.get(number)
        if maps is None:
            maps = self._maps[number] = _map_safetensors(self.path / self.index["shards"][number]["file"])
        return maps


class ShardedArray:
    """One tensor name across all shards; indexing gathers only the rows asked for."""

    def __init__(self, dataset: ActivationDataset, name: str, kind: str) -> None:
        self.dataset, self.name, self.kind = dataset, name, kind
        info = dataset.index["tensors"][name]
        self.shape = (len(dataset), *info["shape"])
        self.dtype = getattr(torch, info["dtype"]) if kind == "torch" else np.dtype(info["dtype"])

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"ShardedArray({self.name!r}, shape={self.shape}, dtype={self.dtype}, {self.kind})"

    @property
    def shards(self) -> list[Any]:
        """The per-shard arrays, memory-mapped (no copy)."""
        return [self._part(s) for s in range(len(self.dataset._starts))]

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            number = int(key) + len(self) if key < 0 else int(key)
            if not 0 <= number < len(self):
                raise IndexError(f"row {key} is out of range: {self.name} has {len(self)} rows")
            shard = bisect.bisect_right(self.dataset._starts, number) - 1
            return self._part(shard)[number - self.dataset._starts[shard]]
        if isinstance(key, slice):
            wanted = np.arange(len(self))[key]
        else:
            wanted = np.asarray(key.cpu() if isinstance(key, torch.Tensor) else key, dtype=np.int64)
            if wanted.ndim != 1:
                raise IndexError("index rows with an int, a slice or a 1-D list of row numbers")
            wanted = np.where(wanted < 0, wanted + len(self), wanted)
            if wanted.size and (wanted.min() < 0 or wanted.max() >= len(self)):
                raise IndexError(f"row numbers out of range: {self.name} has {len(self)} rows")
        return self._gather(wanted)

    def _gather(self, wanted: np.ndarray) -> Any:
        starts = np.asarray(self.dataset._starts, dtype=np.int64)
        shard_of = np.searchsorted(starts, wanted, side="right") - 1
        pieces, order = [], []
        for shard in np.unique(shard_of):
            picked = np.nonzero(shard_of == shard)[0]
            part = self._part(int(shard))
            local = wanted[picked] - starts[shard]
            pieces.append(part[torch.from_numpy(local)] if self.kind == "torch" else part[local])
            order.append(picked)
        if not pieces:
            empty = np.empty((0, *self.shape[1:]))
            return torch.empty(0, *self.shape[1:], dtype=self.dtype) if self.kind == "torch" else empty
        inverse = np.argsort(np.concatenate(order), kind="stable")
        if self.kind == "torch":
            return torch.cat(pieces)[torch.from_numpy(inverse)]
        return np.concatenate(pieces)[inverse]

    def _part(self, shard: int) -> Any:
        array, dtype = self.dataset._shard(shard)[self.name]
        return _as_torch(array, dtype) if self.kind == "torch" else array


def _as_torch(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    tensor = torch.from_numpy(array)  # shares the (copy-on-write) map: no copy
    return tensor.view(dtype) if tensor.dtype != dtype else tensor


def _map_safetensors(path: Path) -> dict[str, tuple[np.ndarray, torch.dtype]]:
    """Every tensor of one safetensors file, memory-mapped where its header says it lies."""
    with open(path, "rb") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(size))
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        np_dtype, torch_dtype = _DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end == begin:
            array = np.zeros(shape, dtype=np_dtype)  # mmap cannot map zero bytes
        else:
            array = np.memmap(path, dtype=np_dtype, mode="c", offset=8 + size + begin, shape=shape)
        out[name] = (array, torch_dtype)
    return out
