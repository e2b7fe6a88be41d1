"""``--backend ray`` with the default isolation: each replica (a Ray actor) holds no model and runs
no user code; its worker process of its own holds the model, is OS-confined, and forks each job's
process from its zygote (``workers/ray_relay.py``).

Against a real ``glassbox serve --backend ray`` (a private Ray instance) whose executor runs RAW
Python (``raw_executor``: as if a job escaped the sandbox): a job cannot reach files, sockets,
other programs or new processes, is not the actor (no Ray inside it), finds nothing of the job
before it anywhere in its memory, and computes what a local run computes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from raw_jobs import leaves_nothing, raw_server, run_raw

from escapes import ESCAPE_NAMES, ESCAPES
from glassbox import LanguageModel
from glassbox.offline import tiny_gpt2_path
from glassbox.server.workers.confine import available

pytest.importorskip("ray")  # the [ray] extra
pytestmark = pytest.mark.skipif(
    not available()["landlock_abi"] or not available()["seccomp"],
    reason="the kernel lacks Landlock or seccomp (isolation='process' refuses to start there)")

PROMPT = "The Eiffel Tower is in"

ATTEMPTS = ESCAPES + """
import sys
attempt("connect", lambda: socket.create_connection(("127.0.0.1", 6379), timeout=2))  # Ray's port
out["ray_here"] = "ray" in sys.modules
with model.trace(prompt):
    logits = model.output.logits
out["logits"] = logits
"""


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The --share-weights folder: the replica's weights are a file there, as operators may run it."""
    return tmp_path_factory.mktemp("ray-raw-weights")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, weights: Path) -> Iterator[tuple[str, str]]:
    state = str(tmp_path_factory.mktemp("ray-raw"))
    share = ("--share-weights", str(weights))
    with raw_server(state, "--backend", "ray", "--torch-threads", "1", *share) as running:
        yield running


def test_a_replica_runs_each_job_confined_and_apart_from_ray(server: tuple[str, str]) -> None:
    out = run_raw(server, ATTEMPTS, PROMPT)
    assert "error" not in out, out
    for name in (*ESCAPE_NAMES, "connect"):
        assert out[name] != "allowed", (name, out)
    assert out["ray_here"] is False  # the job's process was never the actor's
    local = LanguageModel(str(tiny_gpt2_path()), dispatch=True)
    with local.trace(PROMPT):
        expected = local.output.logits.save()
    torch.testing.assert_close(out["logits"], expected, rtol=0, atol=1e-5)


def test_a_replica_leaves_nothing_for_the_next_job(server: tuple[str, str]) -> None:
    assert leaves_nothing(server)["found"] == []


WEIGHTS_ATTEMPTS = """
import ctypes, mmap
def attempt(name, fn):
    try:
        out[name] = fn()
    except Exception as err:
        out[name] = type(err).__name__
weight = model._module.transformer.wte.weight
page = weight.data_ptr() // mmap.PAGESIZE * mmap.PAGESIZE
libc = ctypes.CDLL(None, use_errno=True)
writable = mmap.PROT_READ | mmap.PROT_WRITE
answer = libc.mprotect(ctypes.c_void_p(page), ctypes.c_size_t(mmap.PAGESIZE), writable)
out["mprotect"] = (answer, ctypes.get_errno())
def through_proc_mem():
    with open("/proc/self/mem", "r+b", buffering=0) as mem:
        mem.seek(page)
        return mem.write(bytes(16))
attempt("proc_mem", through_proc_mem)
attempt("open_file", lambda: open(PATH, "r+b").write(bytes(16)))
attempt("chmod_file", lambda: __import__("os").chmod(PATH, 0o666))
out["first"] = weight[0, :4].clone()
"""


def test_a_job_cannot_write_the_weights_file_the_replicas_share(server: tuple[str, str],
                                                                weights: Path) -> None:
    (path,) = weights.glob("glassbox-*.weights")
    before = path.read_bytes()
    out = run_raw(server, WEIGHTS_ATTEMPTS.replace("PATH", repr(str(path))), PROMPT)
    assert "error" not in out, out
    assert out["mprotect"][0] == -1  # EACCES: a read-only descriptor's shared mapping stays read-only
    for name in ("proc_mem", "open_file", "chmod_file"):
        assert isinstance(out[name], str), (name, out)  # an exception's name: nothing was written
    assert path.read_bytes() == before
    digest = path.name.split("-")[1]
    assert hashlib.blake2b(before, digest_size=20).hexdigest() == digest  # still the bytes it is named for
    local = LanguageModel(str(tiny_gpt2_path()), dispatch=True)
    assert torch.equal(out["first"], local._module.transformer.wte.weight[0, :4])
