"""Raw jobs against a real server: a ``glassbox serve`` whose executor runs each job's source as raw,
unsandboxed Python (``raw_executor.py``: as if the job had escaped the sandbox), and the jobs that
look for what an earlier tenant left behind.

Offers:
    raw_server(tmp, *args, env=None)       a context manager: (url, key) of such a server for the tiny
                                           GPT-2; ``args`` go to ``glassbox serve`` (e.g. --backend ray)
    run_raw(server, source, prompt) -> dict   one job; its ``out`` dict, or {"error": JobError}
    submit_raw(server, source, prompt) -> id / finished_raw(server, id) -> dict
                                           the same in two steps (jobs that must queue together)
    leaves_nothing(server) -> dict         a victim's canary, then a search for it (``found`` empty
                                           when nothing of the victim was found)
    VICTIM, FAILING_VICTIM, SEARCH         the jobs themselves
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from collections.abc import Iterator

import pytest

from glassbox.cli import start_server
from glassbox.offline import tiny_gpt2_path
from glassbox.remote import transport
from job_requests import job_request
from waiting import HANG, REQUEST

__all__ = ["FAILING_VICTIM", "SEARCH", "VICTIM", "finished_raw", "leaves_nothing", "raw_server", "run_raw",
           "submit_raw"]

HERE = os.path.dirname(os.path.abspath(__file__))  # tests/server: raw_executor.py


@contextlib.contextmanager
def raw_server(state_dir: str, *args: str, env: dict[str, str] | None = None) -> Iterator[tuple[str, str]]:
    with pytest.MonkeyPatch.context() as patch:  # the server inherits these; this process gets its own back
        for name, value in (env or {}).items():
            patch.setenv(name, value)
        patch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [HERE, os.environ.get("PYTHONPATH")])))
        running = start_server({"gpt2": str(tiny_gpt2_path())}, state_dir=state_dir,
                               args=["--executor", "raw_executor", "--max-batch", "1",
                                     "--max-seconds", str(HANG),  # only against hangs; *args may say less
                                     "--crash-retries", "0", *args])
    try:
        yield running.url, running.create_key("mallory")
    finally:
        running.stop()


def run_raw(server: tuple[str, str], source: str, prompt: str) -> dict:
    return finished_raw(server, submit_raw(server, source, prompt))


def submit_raw(server: tuple[str, str], source: str, prompt: str) -> str:
    url, key = server
    request = job_request(source, inputs=[prompt], first_line=1, model_refs={}, modules={},
                          filename="<remote block>")
    return transport.submit(url, key, request, REQUEST)


def finished_raw(server: tuple[str, str], job: str) -> dict:
    url, key = server
    for _ in transport.events(url, key, job, timeout=HANG):
        pass
    result = transport.result(url, key, job, timeout=REQUEST)
    return {"error": result.error} if not result.ok else result.decoded()["saved"]["out"]


def leaves_nothing(server: tuple[str, str]) -> dict:
    """A victim job with a fresh canary (and a failing one), then a search job: the search's ``out``."""
    canary = "CANARY-" + secrets.token_hex(12)
    victim = run_raw(server, VICTIM.replace("{canary}", canary), canary)
    assert victim["echo"] == canary * 8, victim
    failed = run_raw(server, FAILING_VICTIM, canary)
    assert canary in failed["error"].message
    digest = hashlib.sha256(canary.encode()).hexdigest()
    searched = run_raw(server, f"DIGEST = {digest!r}\n" + SEARCH, "an innocent prompt")
    assert "error" not in searched, searched
    assert searched["regions"] > 0 and searched["scanned_mib"] > 0, searched  # it did look
    return searched


# The victim: the canary in every kind of bytes a job makes the server handle.
VICTIM = """
print(prompt * 4)                                   # printed output (passes the worker as log)
with model.trace(prompt):
    hidden = model.transformer.h[0].output[0]
out["echo"] = prompt * 8                            # a saved value (a result frame)
out["hidden"] = hidden
# {canary} (in the source too)
"""

FAILING_VICTIM = "raise ValueError(prompt * 4)   # the error text of a failed job\n"

# The next tenant: where could it find the canary?
SEARCH = r"""
import ctypes, hashlib, re, numpy, torch
# Known only by its digest: a needle held in this process would be found by the search itself.
pattern = re.compile(rb"CANARY-[0-9a-f]{24}")
found = []

def look_in(where, data):
    if any(hashlib.sha256(m.group()).hexdigest() == DIGEST for m in pattern.finditer(data)):
        found.append(where)

def look(where, address, size):
    if address and size:
        look_in(where, ctypes.string_at(address, size))

# 1. Everything this process can read of its own memory (a full escape's view). /proc/self/maps is
# closed to a job (Landlock), so the readable regions are found from inside: every region that holds
# an object, a malloc'd block or a tensor, grown page by page while the kernel can read the page
# (a write from it into a pipe fails with EFAULT instead of crashing this process).
import gc, os
PAGE = os.sysconf("SC_PAGE_SIZE")
probe_r, probe_w = os.pipe()

def readable(address):
    try:
        os.write(probe_w, (ctypes.c_char * 1).from_address(address))
    except OSError:
        return False
    os.read(probe_r, 1)
    return True

libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.sbrk.restype, libc.sbrk.argtypes = ctypes.c_void_p, [ctypes.c_ssize_t]
seeds = {id(obj) for obj in gc.get_objects()}
seeds |= {libc.malloc(size) for size in (16, 1024, 1 << 16, 1 << 20)} | {libc.sbrk(0) - 1}
seeds |= {t.data_ptr() for t in (torch.zeros(1), torch.zeros(1 << 20))}
regions = []
for seed in sorted(seed for seed in seeds if seed):
    page = seed - seed % PAGE
    if any(low <= page < high for low, high in regions[-1:]) or not readable(page):
        continue
    low, high = page, page + PAGE
    while readable(low - PAGE):
        low -= PAGE
    while readable(high):
        high += PAGE
    regions.append((low, high))
out["regions"] = len(regions)
out["scanned_mib"] = sum(high - low for low, high in regions) >> 20
for low, high in regions:
    look("its own memory", low, high - low)

# 2. Memory handed out uninitialised.
for size in [16 * k for k in range(1, 65)] + [2 ** k for k in range(11, 21)]:
    for _ in range(32 if size <= 1024 else 4):
        look("malloc", libc.malloc(size), size)          # never freed: each call a new chunk
py_malloc = ctypes.pythonapi.PyObject_Malloc
py_malloc.restype, py_malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
for size in range(8, 513, 8):
    for _ in range(64):
        look("PyObject_Malloc", py_malloc(size), size)
kept = []
makers = {"torch.empty": lambda n: torch.empty(n, dtype=torch.uint8),
          "torch.empty_strided": lambda n: torch.empty_strided((n,), (1,), dtype=torch.uint8),
          "new_empty": lambda n: torch.zeros(1, dtype=torch.uint8).new_empty(n),
          "UntypedStorage": lambda n: torch.UntypedStorage(n),
          "numpy.empty": lambda n: numpy.empty(n, dtype=numpy.uint8)}
for size in [2 ** k for k in range(4, 24)]:
    for how, make in makers.items():
        value = make(size)
        kept.append(value)
        if isinstance(value, torch.UntypedStorage):
            data = torch.empty(0, dtype=torch.uint8).set_(value).numpy().tobytes()
        elif isinstance(value, torch.Tensor):
            data = value.numpy().tobytes()
        else:
            data = value.tobytes()
        look_in(how, data)
out["found"] = sorted(set(found))
"""


