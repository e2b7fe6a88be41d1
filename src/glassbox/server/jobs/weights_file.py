"""One read-only file of weights that every process serving the same model on a machine maps
(``--share-weights DIR``): two Ray replicas of a model on one node hold one copy, not two.

Offers:
    map_shared(folder, size, fill) -> SharedWeights
                                 a file of ``size`` bytes in ``folder``, filled by ``fill`` (called
                                 with a writable uint8 tensor over it) unless a file with the same
                                 content is there already; mapped read-only and shared
    SharedWeights                .region (the mmap: MAP_SHARED, PROT_READ), .path,
                                 .close(): unmaps, and removes the file if nobody else maps it
    descriptors() -> list[int]   the open weights files of this process (a process that closes
                                 every other descriptor keeps these: workers/zygote.py)
    sweep(folder) -> list[str]   remove the files in ``folder`` that no process maps any more (what
                                 a killed server left); map_shared runs it first
    NAME_GLOB                    the files this module writes (it touches no others)

How it stays safe:
- **Read-only by construction.** The file is mapped from a descriptor opened read-only, so not
  even ``mprotect`` can make the mapping writable (the kernel answers EACCES); the file's mode is
  0444 and the folder 0700. A job (a body or a job process) is confined by Landlock to paths that
  do not include the folder, so it cannot open the file either.
- **The name is the content**: blake2b of the bytes, and the size. A replica that finds the name
  taken compares the file with what it loaded, byte for byte, before it maps it, and serves its
  own copy if they differ (a name cannot make a replica serve weights it did not load).
- **Lifetime by lock**: the process that maps a file holds a shared ``flock`` on it from before the
  file has its name, through an open file its forks inherit (the zygote keeps it open:
  ``descriptors``). ``close`` and ``sweep`` remove a file only when a fresh open file of their own
  can take the lock exclusively, that is when no process holds it open any more; a killed
  process's lock ends with it, and the next start's sweep removes what it left. A process forked
  from a holder that closed its descriptors (a job's) maps the file without holding it: it lives
  no longer than the holder it was forked from.
- **Not under ``--isolation none``** (the server refuses the pair): there, a job that escaped the
  sandbox runs in the process that holds the model and, as the file's owner, could make the file
  writable again and change every replica's weights on the machine.

Cost, measured with ``bench/shared_weights.py``: see the README (Operating a server). Processes
forked after the mapping (job processes) fault its pages in again from the page cache, as the
kernel does not copy a shared mapping's page tables at fork.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import mmap
import os
import secrets
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["NAME_GLOB", "SharedWeights", "descriptors", "map_shared", "sweep"]

NAME_GLOB = "glassbox-*.weights"
_LOADING_PREFIX = "glassbox-loading-"


@dataclass(eq=False)
class SharedWeights:
    """A weights file mapped read-only (MAP_SHARED) by this process."""

    region: mmap.mmap
    path: str
    fd: int  # read-only; its open file holds the shared lock for as long as any process keeps it
    inode: tuple[int, int]  # (st_dev, st_ino) of the file: a descriptor number may be reused

    def close(self) -> bool:
        """Unmap and let go of the file; remove it if no other process holds it open. Returns
        whether it was removed. The mapping must have no users left (tensors over it)."""
        self.region.close()
        _open.remove(self)
        if _inode(self.fd) == self.inode:  # not a number a fork's keep_only closed and reused
            os.close(self.fd)
        return _remove_if_unused(self.path, self.inode)


# What this process has mapped: a process that closes every descriptor it does not need (the
# zygote, workers/zygote.py) keeps these, so that the files stay locked while it maps them.
_open: list[SharedWeights] = []


def descriptors() -> list[int]:
    """The descriptors of the weights files this process maps (see ``_open``)."""
    return [shared.fd for shared in _open]


def map_shared(folder: str, size: int, fill: Callable[[torch.Tensor], None]) -> SharedWeights:
    """The weights of one model as a read-only shared mapping of a file in ``folder`` (see the
    module docstring). ``fill(buffer)`` copies the weights into ``buffer`` (uint8, ``size``
    bytes); it runs in every process, since the content names the file."""
    root = Path(folder)
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    sweep(folder)
    # Made read-only (0444) from the start, opened for writing this once: a confined worker may not
    # chmod (confine.py), and a model loaded on demand is sealed after the worker is confined.
    temp = str(root / f"{_LOADING_PREFIX}{secrets.token_hex(8)}.weights")
    fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # from its first moment: a sweep elsewhere leaves it alone
        # Allocated, not sparse: a full disk says ENOSPC here, not SIGBUS at a page written below.
        os.posix_fallocate(fd, 0, size)
        with mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE) as writable:
            buffer = torch.frombuffer(writable, dtype=torch.uint8)
            fill(buffer)
            del buffer  # the mapping closes only without users
            digest = hashlib.blake2b(writable, digest_size=20).hexdigest()
        path = str(root / f"glassbox-{digest}-{size}.weights")
        for _ in range(3):  # a file removed between our look and our lock: look again
            try:
                os.link(temp, path)  # fails if the name is taken: never replaces a file in use
            except FileExistsError:
                found = _open_same(path, fd, size)
                if found is None:
                    continue
                if found == -1:  # the name is taken by other bytes: serve our own copy, unnamed
                    break
                return _mapped(found, path)
            return _mapped(_reopen_read_only(path, fd), path)
        return _mapped(_reopen_read_only(temp, fd), temp)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        os.close(fd)


def sweep(folder: str) -> list[str]:
    """Remove this module's files in ``folder`` that no process maps any more; returns their paths."""
    return [str(path) for path in sorted(Path(folder).glob(NAME_GLOB)) if _remove_if_unused(str(path))]


def _remove_if_unused(path: str, inode: tuple[int, int] | None = None) -> bool:
    """Remove ``path`` (if it is still the file ``inode``) when no process holds it open with its
    shared lock: tried through an open file of our own, so that this process's lock, and that of
    the processes it forked, count as others'."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        if inode is not None and _inode(fd) != inode:
            return False
        if _lock_alone(fd) and _names(path, fd):
            os.unlink(path)
            return True
        return False
    finally:
        os.close(fd)


def _mapped(fd: int, path: str) -> SharedWeights:
    region = mmap.mmap(fd, os.fstat(fd).st_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    shared = SharedWeights(region=region, path=path, fd=fd, inode=_inode(fd))
    _open.append(shared)
    return shared


def _inode(fd_or_path: int | str) -> tuple[int, int] | None:
    """(st_dev, st_ino) of an open file or a path; None if there is none (closed, removed)."""
    try:
        found = os.fstat(fd_or_path) if isinstance(fd_or_path, int) else os.stat(fd_or_path)
    except OSError:
        return None
    return found.st_dev, found.st_ino


def _reopen_read_only(path: str, fd: int) -> int:
    """The file behind ``fd`` again, through ``path`` (the name /proc/PID/maps then shows),
    read-only, with a shared lock of its own (the lock taken through ``fd`` ends with ``fd``)."""
    read_only = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    if _inode(read_only) != _inode(fd):
        os.close(read_only)
        raise OSError(f"{path} was replaced while it was written")
    fcntl.flock(read_only, fcntl.LOCK_SH)
    return read_only


def _open_same(path: str, ours: int, size: int) -> int | None:
    """The file at ``path``, read-only and locked shared, if it holds exactly the bytes behind
    ``ours``; -1 if it holds others; None if it was removed before we locked it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        if not _names(path, fd):  # removed (and perhaps made again) between open and lock
            os.close(fd)
            return None
        if os.fstat(fd).st_size != size or not _same_bytes(fd, ours, size):
            os.close(fd)
            return -1
        return fd
    except BaseException:
        os.close(fd)
        raise


def _same_bytes(a: int, b: int, size: int) -> bool:
    with mmap.mmap(a, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ) as first, \
            mmap.mmap(b, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ) as second, \
            warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # frombuffer on read-only memory: we only read
        left, right = torch.frombuffer(first, dtype=torch.uint8), torch.frombuffer(second, dtype=torch.uint8)
        same = torch.equal(left, right)
        del left, right
    return same


def _lock_alone(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _names(path: str, fd: int) -> bool:
    """Does ``path`` still name the file open as ``fd``?"""
    found = _inode(path)
    return found is not None and found == _inode(fd)
