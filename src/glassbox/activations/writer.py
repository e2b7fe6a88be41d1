"""The output folder: numbered safetensors shards and ``index.json``, written so a kill loses little.

Offers:
    ShardWriter(out, settings, run)   opens ``out`` (creating it, or resuming what its index says)
    .done -> int                      documents already stored: a resumed run starts there
    .rows / .tokens                   rows stored and tokens run so far
    .write(tensors, first, stop, tokens)   one shard holding documents [first, stop)
    .advance(stop)                    documents [done, stop) stored no row: only the index moves
    .finish()                         marks the index complete

Crash safety: a shard is written to ``<name>.tmp`` and renamed (atomic on POSIX), then the index
is rewritten the same way. The index only ever names complete shards, and ``done`` is the first
document no shard holds, so a process killed at any point (``kill -9`` included) loses at most
the shard it was writing; the next run deletes leftovers (temporary files, a shard renamed but not
yet indexed) and goes on from ``done``. Shards are numbered in order, so a resumed run rewrites
exactly the files an uninterrupted one would have. Nothing time-dependent is stored, so equal runs
give byte-identical folders. (Data is not fsync'ed: this survives a killed process, not a power cut.)

The layout, readable without glassbox (safetensors + json)::

    index.json     {"format", "settings", "run", "tensors": {name: {"dtype", "shape"}},
                    "shards": [{"file", "rows": [start, stop], "documents": [first, stop],
                                "tokens"}], "rows", "tokens", "done", "complete"}
    shard-00000.safetensors   a tensor per module [rows, ...] (+ "<path>:indices" with topk),
                              "document" and "position" (int64 [rows]; position -1 = pooled)
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

FORMAT = "glassbox.extract/1"
INDEX = "index.json"
_SHARD = re.compile(r"shard-(\d{5,})\.safetensors$")


def shard_name(number: int) -> str:
    return f"shard-{number:05d}.safetensors"


class ShardWriter:
    """Appends shards to ``out`` and keeps its index true after every one."""

    def __init__(self, out: str | os.PathLike, settings: dict, run: dict) -> None:
        self.out = Path(out)
        if self.out.exists() and not self.out.is_dir():
            raise NotADirectoryError(f"out={str(self.out)!r} is a file; give a folder")
        self.out.mkdir(parents=True, exist_ok=True)
        index_path = self.out / INDEX
        if index_path.exists():
            index = json.loads(index_path.read_text())
            if index.get("format") != FORMAT:
                raise ValueError(f"{index_path} is not a glassbox extraction index ({index.get('format')!r})")
            if index["settings"] != settings:
                raise ValueError(_mismatch(index_path, index["settings"], settings))
            index["run"] = run  # batching may change on resume: shard sizes differ, values do not
        else:
            if any(self.out.iterdir()):
                raise FileExistsError(f"out={str(self.out)!r} is not empty and holds no {INDEX}; give an "
                                      "empty or new folder (extract writes shards and an index there)")
            index = {"format": FORMAT, "settings": settings, "run": run, "tensors": {}, "shards": [],
                     "rows": 0, "tokens": 0, "done": 0, "complete": False}
        self.index = index
        self._clean()
        self._save_index()  # at once: a folder with anything else in it always has its index

    @property
    def done(self) -> int:
        return int(self.index["done"])

    @property
    def rows(self) -> int:
        return int(self.index["rows"])

    @property
    def tokens(self) -> int:
        return int(self.index["tokens"])

    @property
    def complete(self) -> bool:
        return bool(self.index["complete"])

    def write(self, tensors: dict[str, torch.Tensor], first: int, stop: int, tokens: int) -> None:
        """Store one shard (its rows follow the rows already stored) covering documents [first, stop)."""
        if first != self.done:
            raise RuntimeError(f"shard for documents from {first}, but {self.done} are done")
        rows = len(tensors["document"])
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
        schema = {name: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape[1:])}
                  for name, t in sorted(tensors.items())}
        if self.index["tensors"] and schema != self.index["tensors"]:
            raise RuntimeError(f"shard tensors {schema} differ from earlier shards' {self.index['tensors']}")
        name = shard_name(len(self.index["shards"]))
        _atomic(self.out / name, lambda path: save_file(tensors, path))
        self.index["tensors"] = schema
        self.index["shards"].append({"file": name, "rows": [self.rows, self.rows + rows],
                                     "documents": [first, stop], "tokens": tokens})
        self.index["rows"] += rows
        self._advance(stop, tokens)

    def advance(self, stop: int, tokens: int = 0) -> None:
        """Documents up to ``stop`` are done without storing a row (nothing selected in them)."""
        if stop > self.done:
            self._advance(stop, tokens)

    def finish(self) -> None:
        self.index["complete"] = True
        self._save_index()

    # ---------------------------------------------------------------- internals

    def _advance(self, stop: int, tokens: int) -> None:
        self.index["done"] = stop
        self.index["tokens"] += tokens
        self._save_index()

    def _save_index(self) -> None:
        # one line per shard: the index stays readable (and quick to rewrite) with thousands of them
        head = json.dumps({k: v for k, v in self.index.items() if k != "shards"}, indent=1, sort_keys=True)
        shards = ",\n  ".join(json.dumps(shard, sort_keys=True) for shard in self.index["shards"])
        text = head[:-2] + ',\n "shards": [\n  ' + shards + "\n ]\n}\n"
        _atomic(self.out / INDEX, lambda path: Path(path).write_text(text))

    def _clean(self) -> None:
        """Delete what a killed run left: temporary files and shards the index does not name."""
        indexed = {shard["file"] for shard in self.index["shards"]}
        for path in self.out.iterdir():
            if path.name.endswith(".tmp") or (_SHARD.match(path.name) and path.name not in indexed):
                path.unlink()


def _atomic(path: Path, write: Any) -> None:
    temporary = path.with_name(path.name + ".tmp")
    write(str(temporary))
    os.replace(temporary, path)


def _mismatch(index_path: Path, before: dict, now: dict) -> str:
    changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    details = "; ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed)
    return (f"{index_path} holds an extraction with other settings ({details}); running the same call "
            "again resumes it; for a different extraction give another folder (or delete this one)")
