"""Read-only weights: a CPU model's parameters moved into memory the process cannot write.

Offers:
    seal(module, share_dir="") -> int
                                 move every CPU parameter into one anonymous mapping and make it
                                 read-only (``mprotect(PROT_READ)``); returns the bytes sealed.
                                 With ``share_dir``: into a read-only file there that every process
                                 serving the same weights on this machine maps (weights_file.py)
    is_sealed(tensor) -> bool    does the tensor's memory lie in a sealed mapping?
    release(module) -> int       unmap that memory again (the model is being evicted)

Why: the sandbox refuses the write paths it knows, and a checksum after the job finds the ones it
does not, but only AFTER the job: co-tenants of a batched pass would already have computed with
the changed weights. Read-only memory makes the whole class impossible: a write from any path
(``param.data.zero_()``, a module the user built around a weight, C code, numpy) faults, the
process that ran the job dies, and the job fails alone (the worker forks a fresh process per job
or batch, see ``workers/forked.py``).

Replicas on one node each hold their own copy (the mapping is private: see ``seal``), unless the
server shares them through a folder (``--share-weights``): then the one copy is a file mapped
read-only from a read-only descriptor, which not even ``mprotect`` can make writable.

What stays writable: buffers (models may update them, e.g. a rotary cache), gradients (``.grad``
is new memory), and anything on a GPU (the device has no such protection; see the README).
Tied parameters (``lm_head.weight is embed_tokens.weight``) stay tied: each storage is copied once
and every parameter over it is re-pointed at the copy with its own size, stride and offset.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
import warnings

import torch

from .weights_file import SharedWeights, map_shared

__all__ = ["is_sealed", "release", "seal"]

_PAGE = mmap.PAGESIZE
# (start address, size, mapping, its shared file or None): kept until release
_regions: list[tuple[int, int, mmap.mmap, SharedWeights | None]] = []


def seal(module: torch.nn.Module, share_dir: str = "") -> int:
    """Make ``module``'s CPU parameters read-only memory (see the module docstring)."""
    storages: dict[int, torch.UntypedStorage] = {}
    params = []
    for param in module.parameters(recurse=True):
        if param.device.type != "cpu" or param.numel() == 0 or is_sealed(param):
            continue
        storage = param.untyped_storage()
        storages.setdefault(storage.data_ptr(), storage)
        params.append(param)
    if not storages:
        return 0
    offsets, total = {}, 0
    for ptr, storage in storages.items():
        # Each copy keeps its original's address modulo a page: CPU kernels pick their code paths
        # by alignment, so a differently aligned copy computes slightly different numbers
        # (measured: greedy-generation logits 4e-6 apart), and remote would not equal local.
        total += (ptr - total) % _PAGE
        offsets[ptr] = total
        total += storage.nbytes()
    total = (total + 63) // 64 * 64 or 64  # whole.view(dtype) needs a multiple of every element size

    def fill(whole: torch.Tensor) -> None:
        for ptr, storage in storages.items():
            start = offsets[ptr]
            original = torch.frombuffer(_bytes_of(storage), dtype=torch.uint8)
            whole[start:start + storage.nbytes()].copy_(original)

    shared = map_shared(share_dir, total, fill) if share_dir else None
    if shared is not None:
        region = shared.region
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # frombuffer warns of read-only memory: it is meant
            whole = torch.frombuffer(region, dtype=torch.uint8)
    else:
        # Private, not shared: a forked job process then inherits the page tables (with a shared
        # mapping each process faulted every page in again: a SmolLM2 job measured ~14 ms slower).
        region = mmap.mmap(-1, total, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_HUGEPAGE"):  # fewer page-table entries to copy at each fork
            region.madvise(mmap.MADV_HUGEPAGE)
        whole = torch.frombuffer(region, dtype=torch.uint8)
        fill(whole)
    with torch.no_grad():
        for param in params:
            start = offsets[param.untyped_storage().data_ptr()]  # aligned as the original was
            # as_strided's offset counts from the start of the whole region, in elements
            offset = start // param.element_size() + param.storage_offset()
            param.data = whole.view(param.dtype).as_strided(param.size(), param.stride(), offset)
    address = whole.data_ptr()
    if shared is None:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.mprotect(ctypes.c_void_p(address), ctypes.c_size_t(total), mmap.PROT_READ) != 0:
            raise OSError(ctypes.get_errno(), "mprotect(PROT_READ) of the model weights failed")
    _regions.append((address, total, region, shared))
    return total


def release(module: torch.nn.Module) -> int:
    """Unmap the read-only memory that ``seal`` made for ``module`` (the module is being evicted);
    returns the bytes unmapped. Its parameters are first pointed away from that memory; a region
    that something else still references (checked by reference count) is kept: unmapping memory a
    live tensor points to would crash the worker at its next use."""
    params = [p for p in module.parameters(recurse=True) if is_sealed(p)]
    starts = {next(start for start, size, _, _ in _regions
                   if start <= p.untyped_storage().data_ptr() < start + size) for p in params}
    with torch.no_grad():
        for param in params:
            param.data = torch.empty(0, dtype=param.dtype)
    del params
    freed = 0
    for entry in [e for e in _regions if e[0] in starts]:
        region, shared = entry[2], entry[3]
        # Referenced by: its _regions tuple, ``region`` and getrefcount's argument (and the shared
        # file's record). A tensor's storage over the memory holds one more (torch.frombuffer
        # keeps its buffer alive).
        if sys.getrefcount(region) > 3 + (shared is not None):
            continue
        _regions.remove(entry)
        freed += entry[1]
        del region
        if shared is not None:
            shared.close()  # removes the file if no other process maps it
        else:
            entry[2].close()
    return freed


def is_sealed(tensor: torch.Tensor) -> bool:
    if tensor.device.type != "cpu":
        return False
    ptr = tensor.untyped_storage().data_ptr()
    return any(start <= ptr < start + size for start, size, _, _ in _regions)


def _bytes_of(storage: torch.UntypedStorage) -> memoryview:
    raw = (ctypes.c_ubyte * storage.nbytes()).from_address(storage.data_ptr())
    return memoryview(raw).cast("B")
