"""Weights shared through a folder (``--share-weights``, ``jobs/weights_file.py``): processes that
serve the same weights on one machine map one read-only file.

On the real tiny GPT-2: two loads sealed into one folder map ONE file (its pages counted once) and
compute what an unsealed load computes, bit for bit; the file is removed when the last one lets
go; not even ``mprotect`` can make the mapping writable, and a write faults; a file that bears
the right name but other bytes is not served; a sweep removes only what no process maps.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from glassbox import LanguageModel
from glassbox.offline import tiny_gpt2_path
from glassbox.server.config import ServerConfig
from glassbox.server.jobs.sealed import is_sealed, release, seal
from glassbox.server.jobs.weights_file import NAME_GLOB, sweep

PROMPT = "The Eiffel Tower is in"


def load() -> LanguageModel:
    return LanguageModel(tiny_gpt2_path(), dispatch=True)


def logits(model: LanguageModel) -> torch.Tensor:
    with model.trace(PROMPT):
        out = model.output.logits.save()
    return out


def mapped_files(pid: int | str = "self") -> dict[str, list[tuple[int, int]]]:
    """Path -> the address ranges of its mappings in a process (/proc/PID/maps)."""
    found: dict[str, list[tuple[int, int]]] = {}
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].startswith("/"):
            start, end = (int(x, 16) for x in parts[0].split("-"))
            found.setdefault(parts[5], []).append((start, end))
    return found


def within(ranges: list[tuple[int, int]], address: int) -> bool:
    return any(start <= address < end for start, end in ranges)


def test_two_loads_of_one_model_map_one_read_only_file(tmp_path):
    expected = logits(load())
    first, second = load(), load()
    seal(first._module, share_dir=str(tmp_path))
    seal(second._module, share_dir=str(tmp_path))
    try:
        files = list(tmp_path.glob(NAME_GLOB))
        assert len(files) == 1, files  # one copy for both
        assert files[0].stat().st_mode & 0o777 == 0o444
        ranges = mapped_files()[str(files[0])]
        for model in (first, second):
            assert all(is_sealed(p) and within(ranges, p.data_ptr()) for p in model._module.parameters())
        # two mappings of the one file (each load maps it once), not one load's memory reused
        a, b = (m._module.transformer.wte.weight.data_ptr() for m in (first, second))
        assert len(ranges) >= 2 and not any(within([r], a) and within([r], b) for r in ranges)
        assert torch.equal(logits(first), expected) and torch.equal(logits(second), expected)
    finally:
        release(first._module)
        assert files[0].exists()  # the second still maps it
        release(second._module)
    assert not files[0].exists()  # the last one to let go removed it


WRITE_ATTEMPT = textwrap.dedent("""
    import ctypes, errno, mmap, sys, torch
    from glassbox.server.jobs.sealed import seal
    layer = torch.nn.Linear(256, 256)
    seal(layer, share_dir=sys.argv[1])
    libc = ctypes.CDLL(None, use_errno=True)
    page = layer.weight.data_ptr() // mmap.PAGESIZE * mmap.PAGESIZE
    answer = libc.mprotect(ctypes.c_void_p(page), ctypes.c_size_t(mmap.PAGESIZE),
                           mmap.PROT_READ | mmap.PROT_WRITE)
    print("mprotect", answer, errno.errorcode.get(ctypes.get_errno()), flush=True)
    try:  # the kernel's forced write (what a debugger uses) may not write a shared read-only mapping
        with open("/proc/self/mem", "r+b", buffering=0) as mem:
            mem.seek(page)
            print("proc_mem wrote", mem.write(bytes(16)), flush=True)
    except OSError as err:
        print("proc_mem", errno.errorcode.get(err.errno), flush=True)
    layer.weight.data.zero_()
    print("wrote", flush=True)
""")


def test_not_even_mprotect_or_proc_mem_writes_the_shared_mapping(tmp_path):
    """The mapping on its own, in a process with no other confinement (no Landlock, no sandbox)."""
    ran = subprocess.run([sys.executable, "-c", WRITE_ATTEMPT, str(tmp_path)], capture_output=True,
                         text=True, timeout=300)
    assert "mprotect -1 EACCES" in ran.stdout, (ran.stdout, ran.stderr)
    assert "proc_mem EIO" in ran.stdout, ran.stdout
    assert "wrote" not in ran.stdout
    assert ran.returncode == -11  # SIGSEGV: the write faulted
    # its process died without letting go: the next sweep removes what it left
    assert len(sweep(str(tmp_path))) == 1 and not list(tmp_path.glob(NAME_GLOB))


def test_a_name_with_other_bytes_behind_it_is_not_served(tmp_path):
    honest = load()
    seal(honest._module, share_dir=str(tmp_path / "first"))
    (made,) = (tmp_path / "first").glob(NAME_GLOB)
    forged = tmp_path / "second" / made.name
    forged.parent.mkdir()
    data = bytearray(made.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, same name, one byte changed
    forged.write_bytes(bytes(data))
    release(honest._module)
    holder = os.open(forged, os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_SH)  # as if another process mapped it: the sweep leaves it
    model = load()
    try:
        expected = logits(load())
        seal(model._module, share_dir=str(forged.parent))
        assert torch.equal(logits(model), expected)
        weight = model._module.transformer.wte.weight.data_ptr()
        assert not within(mapped_files().get(str(forged), []), weight)
        assert forged.read_bytes() == bytes(data)  # left as it was
    finally:
        release(model._module)
        os.close(holder)


def test_a_sweep_removes_only_files_that_nobody_maps(tmp_path):
    left = tmp_path / "glassbox-aaaa-64.weights"
    held = tmp_path / "glassbox-bbbb-64.weights"
    other = tmp_path / "notes.weights"
    for path in (left, held, other):
        path.write_bytes(b"x" * 64)
    holder = os.open(held, os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_SH)
    try:
        assert sweep(str(tmp_path)) == [str(left)]
        assert held.exists() and other.exists() and not left.exists()
    finally:
        os.close(holder)


def test_the_server_passes_the_folder_and_refuses_it_without_isolation(tmp_path):
    path = str(tiny_gpt2_path())
    config = ServerConfig(models={"tiny": path}, share_weights=str(tmp_path))
    assert config.worker_specs()["tiny"]["share_weights"] == str(tmp_path)
    assert "share_weights" not in ServerConfig(models={"tiny": path}).worker_specs()["tiny"]
    with pytest.raises(ValueError, match="--isolation process"):
        ServerConfig(models={"tiny": path}, share_weights=str(tmp_path), isolation="none")
