"""Co-tenant batches, split: one forward for several requests, each request's code in a process of its
own that holds nothing of its neighbours and cannot change what they compute.

Against a real ``glassbox serve`` with co-tenant batching on, whose executor runs each body RAW
(``raw_executor``: as if every request had escaped the sandbox). Three requests queue together
and run as one batch: an attacker and two victims. The attacker registers hooks on every module,
replaces torch functions, edits and replaces its own rows, calls every module it can reach, reads
its environment and every descriptor, walks the garbage collector and its whole address space,
and allocates uninitialised memory in every way torch and numpy offer, looking for the victims'
prompt. Then: the victims' values equal their lone runs, the attacker found nothing, the next job
finds nothing of any of them, and the weights are what they were. The same on ``--backend ray``.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Iterator

import pytest
import torch
from raw_jobs import SEARCH, finished_raw, raw_server, run_raw, submit_raw

from glassbox.remote import transport
from glassbox.server.workers.confine import available
from waiting import wait_until

pytestmark = pytest.mark.skipif(
    not available()["landlock_abi"] or not available()["seccomp"],
    reason="the kernel lacks Landlock or seccomp (isolation='process' refuses to start there)")

VICTIM_BODY = """
import os
out["pid"] = os.getpid()
out["view"] = type(model.active).__name__
out["h"] = model.transformer.h[2].output.clone()
out["logits"] = model.output.logits.clone()
"""
VICTIM_ALONE = """
with model.trace(prompt):
    h = model.transformer.h[2].output.clone()
    logits = model.output.logits.clone()
out["h"], out["logits"] = h, logits
"""
ATTACKER = """
import os, torch
out["pid"] = os.getpid()
out["view"] = type(model.active).__name__
# Hooks on every module of the model this process holds, torch functions replaced.
net = model._module
for m in net.modules():
    m.register_forward_hook(lambda mod, args, out: out * 0 if isinstance(out, torch.Tensor) else out)
torch.nn.functional.softmax = lambda *a, **k: a[0] * 0
torch.Tensor.softmax = lambda self, *a, **k: self * 0
torch.matmul = lambda a, b: a @ b * 0
# Its own rows in the shared forward: edited in place, then replaced (the right layout: accepted).
h = model.transformer.h[0].output
h.fill_(1e4)
later = model.transformer.h[1].output
model.transformer.h[1].output = torch.full_like(later, -1e4)
# Every module it can reach, called on its own tensors.
called = 0
for m in net.modules():
    for x in (torch.zeros(1, 3, dtype=torch.long), torch.randn(1, 3, net.config.n_embd)):
        try:
            m(x)
            called += 1
        except Exception:
            pass
out["called"] = called
# Its environment and every descriptor it holds.
try:
    out["environ"] = open("/proc/self/environ", "rb").read().decode(errors="replace")
except OSError as err:
    out["environ"] = type(err).__name__
fds = []
for fd in range(3, 1024):
    try:
        os.fstat(fd)
        fds.append(fd)
    except OSError:
        pass
out["fds"] = fds
"""


def _server(tmp: str, *args: str) -> Iterator[tuple[str, str]]:
    with raw_server(tmp, "--max-batch", "4", "--torch-threads", "1", *args) as running:
        yield running


@pytest.fixture(scope="module", params=["local", "ray"])
def server(request: pytest.FixtureRequest,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    if request.param == "ray":
        pytest.importorskip("ray")  # the [ray] extra
    yield from _server(str(tmp_path_factory.mktemp(f"split-{request.param}")), "--backend", request.param)


def _status(server: tuple[str, str], job: str) -> str:
    return str(transport.status(*server, job)["status"])


def _as_one_batch(server: tuple[str, str], sources: list[tuple[str, str]]) -> list[dict]:
    """Run ``sources`` ((source, prompt) pairs) queued together: behind a job that runs until it is
    cancelled, so that they are all waiting when the worker next takes jobs."""
    blocker = submit_raw(server, "while True:\n    pass\n", "hold the worker")
    wait_until(lambda: _status(server, blocker) == "RUNNING", "the blocking job to run")
    jobs = [submit_raw(server, source, prompt) for source, prompt in sources]
    wait_until(lambda: all(_status(server, job) == "QUEUED" for job in jobs), "the batch to queue")
    transport.cancel(*server, blocker)
    return [finished_raw(server, job) for job in jobs]


def _weights() -> str:
    return 'out["sum"] = sum(float(p.double().sum()) for p in model._module.parameters())\n'


def test_a_raw_body_in_a_batch_reaches_nothing_of_its_neighbours(server: tuple[str, str]) -> None:
    canary = "CANARY-" + secrets.token_hex(12)  # both victims' prompt
    digest = hashlib.sha256(canary.encode()).hexdigest()
    before = run_raw(server, _weights(), "weights")["sum"]
    alone = run_raw(server, VICTIM_ALONE, canary)
    attacker = ATTACKER + f"DIGEST = {digest!r}\n" + SEARCH
    results = _as_one_batch(server, [(attacker, "CANARY-" + secrets.token_hex(12)),
                                     (VICTIM_BODY, canary), (VICTIM_BODY, canary)])
    attack, victims = results[0], results[1:]
    for victim in victims:  # each ran as a body of the shared pass, in a process of its own
        assert "error" not in victim, victim
        assert victim["view"] == "HostView"
        assert (victim["logits"] - alone["logits"]).abs().max() <= 1e-4
        assert (victim["h"] - alone["h"]).abs().max() <= 1e-4
    assert "error" not in attack, attack
    assert attack["view"] == "HostView" and attack["called"] > 0
    assert len({attack["pid"], *(v["pid"] for v in victims)}) == 3
    assert attack["found"] == [] and attack["regions"] > 0  # it searched, and found no victim
    assert canary not in repr({k: attack[k] for k in ("environ", "fds")})
    # The next job finds nothing of the batch, and the weights are what they were.
    searched = run_raw(server, f"DIGEST = {digest!r}\n" + SEARCH, "an innocent prompt")
    assert searched["found"] == [] and searched["regions"] > 0
    assert run_raw(server, _weights(), "weights")["sum"] == before
    again = run_raw(server, VICTIM_ALONE, canary)
    assert torch.equal(again["logits"], alone["logits"])


def test_a_body_that_breaks_the_grammar_leaves_its_neighbours_served(server: tuple[str, str]) -> None:
    """A body that writes garbage into its link: the host stops serving it; the others finish."""
    garbage = ('h = model.transformer.h[0].output\n'
               'import os\n'
               'os.write(model.active.link.sock.fileno(), b"\\xff" * 64)\n'
               'out["h"] = model.transformer.h[1].output\n')
    results = _as_one_batch(server, [(garbage, "Hello"), (VICTIM_BODY, "The Eiffel Tower is in"),
                                     (VICTIM_BODY, "Paris")])
    assert "error" in results[0]  # it could not go on in the pass
    alone = run_raw(server, VICTIM_ALONE, "Paris")
    assert results[2]["view"] == "HostView"
    assert (results[2]["logits"] - alone["logits"]).abs().max() <= 1e-4


def test_one_host_runs_every_pass_and_a_dead_host_is_replaced(tmp_path) -> None:
    """A lone plain trace runs split too; the host is one long-lived process (the spare job process
    changes with every job, the host does not); a host that died is replaced at the next pass."""
    import signal

    import httpx
    import psutil

    with raw_server(str(tmp_path), "--torch-threads", "1") as server:  # batching off: lone jobs only
        url, key = server
        health = httpx.get(url + "/v1/health", headers={"Authorization": f"Bearer {key}"}, timeout=30).json()
        worker = psutil.Process(health["replicas"][0]["pid"])

        def forked() -> set[int]:  # the zygote's children: the host and the next job's process
            return {child.pid for zygote in worker.children() for child in zygote.children()
                    if child.status() != psutil.STATUS_ZOMBIE}

        first = run_raw(server, VICTIM_BODY, "Paris")
        assert first["view"] == "HostView", first  # a body of a pass of one
        after_first = forked()
        second = run_raw(server, VICTIM_BODY, "Paris")
        assert torch.equal(second["logits"], first["logits"]) and second["pid"] != first["pid"]
        [host] = after_first & forked()
        os.kill(host, signal.SIGKILL)
        finished_raw(server, submit_raw(server, VICTIM_BODY, "Paris"))  # its pass finds the host gone
        fourth = run_raw(server, VICTIM_BODY, "Paris")
        assert fourth["view"] == "HostView" and torch.equal(fourth["logits"], first["logits"]), fourth
        assert host not in forked() and len(forked() - {host}) == 2  # a new host, and the spare


def test_a_raw_body_cannot_signal_the_host_the_zygote_the_worker_or_the_api(tmp_path) -> None:
    """Killing the host would end its neighbours' pass; killing the zygote or the worker, every
    later job. Landlock's signal scope (ABI >= 6) confines signals to a process's own domain: a
    body's probe (signal 0, the permission check alone) is refused for each of them."""
    import httpx
    import psutil

    if available()["landlock_abi"] < 6:
        pytest.skip("Landlock ABI < 6: no signal scoping on this kernel")
    with raw_server(str(tmp_path), "--torch-threads", "1") as server:
        url, key = server
        health = httpx.get(url + "/v1/health", headers={"Authorization": f"Bearer {key}"}, timeout=30).json()
        worker = psutil.Process(health["replicas"][0]["pid"])
        [zygote] = worker.children()

        def forked() -> set[int]:
            return {child.pid for child in zygote.children() if child.status() != psutil.STATUS_ZOMBIE}

        run_raw(server, VICTIM_BODY, "Paris")
        seen = forked()
        run_raw(server, VICTIM_BODY, "Paris")
        [host] = seen & forked()
        targets = {"host": host, "zygote": zygote.pid, "worker": worker.pid, "api": worker.ppid()}
        probe = (f"import os\nout['view'] = type(model.active).__name__\nout['refused'] = {{}}\n"
                 f"out['h'] = model.transformer.h[0].output.clone()\n"
                 f"for name, pid in [*{targets!r}.items(), ('itself', os.getpid())]:\n"
                 "    try:\n        os.kill(pid, 0)\n        out['refused'][name] = False\n"
                 "    except PermissionError:\n        out['refused'][name] = True\n")
        probed = run_raw(server, probe, "Paris")
        assert probed["view"] == "HostView", probed
        # refused for each of them, and the probe itself works: a process may signal itself
        assert probed["refused"] == {**dict.fromkeys(targets, True), "itself": False}, probed["refused"]
        assert host in forked()  # and the host is still there
