"""Isolation that does not depend on the sandbox: a real server whose executor runs RAW Python.

``raw_executor`` (test-only) runs each job's source with no sandbox at all, as if a job had
escaped it. What must still hold, each shown against a real ``glassbox serve``:
- the OS confinement of the job's process: no files outside Python's own, no writes, no
  sockets, no exec, no new processes;
- nothing a job does outlives it: hooks, patched torch functions, module globals, torch's global
  state, edited configs, objects left for ``gc`` to find, freed memory;
- the weights are read-only memory: a raw write kills only that job's process; the worker, its
  models and the next tenant's numbers are untouched, and no worker restart is needed.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import httpx
import pytest
import torch
from raw_jobs import raw_server, run_raw

from glassbox import LanguageModel
from glassbox.offline import tiny_gpt2_path
from glassbox.server.workers.confine import available
from waiting import HANG, REQUEST

PROMPT = "The Eiffel Tower is in"

pytestmark = pytest.mark.skipif(
    not available()["landlock_abi"] or not available()["seccomp"],
    reason="the kernel lacks Landlock or seccomp (isolation='process' refuses to start there)")


def _serve(tmp_path_factory: pytest.TempPathFactory, max_seconds: float) -> Iterator[tuple[str, str]]:
    with raw_server(str(tmp_path_factory.mktemp("raw")), "--max-seconds", str(max_seconds)) as running:
        yield running


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    yield from _serve(tmp_path_factory, HANG)  # a limit only for a job that hangs


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    yield from _serve(tmp_path_factory, 10)  # for the one job that is stopped by the time limit


def _run(server: tuple[str, str], source: str) -> dict:
    """Run raw ``source`` as one job on ``PROMPT``; its ``out`` dict, or the ERROR result's error."""
    return run_raw(server, source, PROMPT)


def _worker_pids(server: tuple[str, str]) -> list:
    url, key = server
    health = httpx.get(url + "/v1/health", headers={"Authorization": f"Bearer {key}"}, timeout=REQUEST).json()
    return [replica.get("pid") for replica in health.get("replicas", [])]


# What a fresh job sees: compared before and after hostile jobs.
STATE = """
import gc, sys, glassbox
import torch.nn.functional as F
layers = list(model._module.modules())
out["hooks"] = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in layers)
out["linear_patched"] = F.linear is not torch._C._nn.linear
out["leak"] = hasattr(glassbox, "LEAKED")
out["grad"] = torch.is_grad_enabled()
out["inference"] = torch.is_inference_mode_enabled()
out["autocast"] = torch.is_autocast_enabled("cpu")
out["dtype"] = str(torch.get_default_dtype())
out["deterministic"] = torch.are_deterministic_algorithms_enabled()
out["threads_ok"] = torch.get_num_threads() >= 1
out["config_edit"] = getattr(model._module.config, "stolen", None)
out["input_names"] = list(model.tokenizer.model_input_names)
out["found_secret"] = any(isinstance(o, str) and o.startswith("SECRET-OF-A-") for o in gc.get_objects())
fresh = torch.empty(4_000_000)
out["stale_memory"] = bool((fresh == 1234.5).any())
out["rand"] = float(torch.rand(1))
with model.trace(prompt):
    logits = model.output.logits
out["logits"] = logits
"""

HOSTILE = """
import gc, glassbox, torch.nn.functional as F
secret = "SECRET-OF-A-" + "x" * 10
glassbox.LEAKED = [secret]
model._module.transformer.h[0].register_forward_hook(lambda m, i, o: o * 0)
F.linear = lambda *a, **k: None
torch.set_grad_enabled(False)
torch.set_default_dtype(torch.float64)
torch.use_deterministic_algorithms(True)
torch.manual_seed(12345)
model._module.config.stolen = secret
model.tokenizer.model_input_names.append("stolen")
def parked():
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.inference_mode():
        yield 1
generator = parked(); next(generator)
glassbox.PARKED = generator
big = torch.full((4_000_000,), 1234.5)
del big
gc.collect()
out["done"] = True
"""


def test_the_job_process_cannot_reach_files_sockets_or_other_processes(server: tuple[str, str],
                                                                       tmp_path) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    target = tmp_path / "written.txt"
    try:
        out = _run(server, f"""
import os, socket, subprocess
def attempt(name, fn):
    try:
        fn()
        out[name] = "allowed"
    except Exception as err:
        out[name] = type(err).__name__
attempt("read_passwd", lambda: open("/etc/passwd").read())
attempt("write_file", lambda: open({str(target)!r}, "w").write("x"))
attempt("connect", lambda: socket.create_connection(("127.0.0.1", {port}), timeout=2))
attempt("exec", lambda: os.execv("/bin/true", ["true"]))
attempt("subprocess", lambda: subprocess.run(["/bin/true"]))
attempt("fork", lambda: os._exit(0) if os.fork() == 0 else None)
attempt("environ_secret", lambda: [k for k in os.environ if "KEY" in k or "DB_URL" in k][0])
""")
    finally:
        listener.close()
    assert "error" not in out, out
    for name in ("read_passwd", "write_file", "connect", "exec", "subprocess", "fork", "environ_secret"):
        assert out[name] != "allowed", (name, out)
    assert not target.exists()


def test_nothing_a_job_does_outlives_it(server: tuple[str, str]) -> None:
    before = _run(server, STATE)
    assert "error" not in before, before
    hostile = _run(server, HOSTILE)
    assert hostile == {"done": True}
    after = _run(server, STATE)
    for name in ("hooks", "linear_patched", "leak", "grad", "inference", "autocast", "dtype",
                 "deterministic", "config_edit", "input_names", "found_secret", "stale_memory", "rand"):
        assert after[name] == before[name], name
    assert after["hooks"] == 0 and not after["leak"]
    assert not after["found_secret"] and not after["stale_memory"]
    assert torch.equal(after["logits"], before["logits"])
    local = LanguageModel(str(tiny_gpt2_path()), dispatch=True)
    with local.trace(PROMPT):
        expected = local.output.logits.save()
    assert torch.equal(after["logits"], expected)


def test_a_raw_write_to_the_weights_kills_only_that_job(server: tuple[str, str]) -> None:
    before = _run(server, STATE)
    pids = _worker_pids(server)
    write = "model._module.transformer.h[0].mlp.c_fc.weight.data.zero_()\nout['wrote'] = True\n"
    crashed = _run(server, write)
    assert "error" in crashed and crashed["error"].type == "WorkerCrashed", crashed
    assert "read-only" in crashed["error"].message
    after = _run(server, STATE)
    assert torch.equal(after["logits"], before["logits"])  # the weights are what they were
    assert _worker_pids(server) == pids  # the same worker: nothing had to be reloaded


def test_a_job_cannot_write_into_the_feeders_pipe(server: tuple[str, str]) -> None:
    # Every descriptor the job's process holds gets a forged frame; the feeder's pipe is not among
    # them (closed at fork), so the worker and its queue go on; the job's own pipe is read by the
    # worker, which takes nothing from it but this job's answers.
    pids = _worker_pids(server)
    forged = _run(server, """
import os, struct, json
fake = json.dumps({"op": "result", "job": "someone-else", "result": {"status": "COMPLETED"}}).encode()
for fd in range(3, 256):
    try:
        os.write(fd, struct.pack("<Q", len(fake)) + fake)
    except OSError:
        pass
out["done"] = True
""")
    assert forged == {"done": True}, forged  # its forged frame went nowhere; its own answer came back
    after = _run(server, STATE)
    assert "error" not in after, after
    assert _worker_pids(server) == pids


def test_a_job_cannot_signal_the_worker_that_forked_it(server: tuple[str, str]) -> None:
    pids = _worker_pids(server)
    out = _run(server, """
import os, signal
try:
    os.kill(os.getppid(), signal.SIGKILL)
    out["kill"] = "allowed"
except OSError as err:
    out["kill"] = type(err).__name__
""")
    assert out.get("kill") == "PermissionError", out
    assert "error" not in _run(server, STATE)
    assert _worker_pids(server) == pids  # the same worker: nothing to reload for anyone


def test_a_job_that_closes_its_pipe_and_runs_on_is_stopped_without_a_restart(limited: tuple[str, str]
                                                                            ) -> None:
    server = limited
    pids = _worker_pids(server)
    out = _run(server, """
import os
os.closerange(3, 256)   # its pipe to the worker included: the worker sees it as finished
while True:
    pass
""")
    assert out["error"].type == "TimeoutError", out
    assert "error" not in _run(server, STATE)
    assert _worker_pids(server) == pids  # stopped by the worker, not by restarting it
