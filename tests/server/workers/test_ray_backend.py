"""The ``ray`` backend with real Ray: ``glassbox serve --backend ray`` in a subprocess, starting a
private Ray instance, each replica of the tiny GPT-2 a Ray actor.

Equal values to a local run from every replica of two models (replicas that hold no secrets of
the server's environment; Ray listening on loopback only); a replica killed (SIGKILL) under a
running job: the job runs once more, the jobs behind it complete (ten behind the one replica of a
model, beside two CPU hogs), the server answers throughout and the replica comes back; the API
process killed with jobs queued: none is lost; a replica no node can hold: the server does not
start, and says which resource and flag.

The job that is running when something is killed never ends on its own (FOREVER): a job that ran
for a fixed number of steps raced the test, which must see it running, queue jobs behind it and
kill its replica before it ends, however busy the machine is. Once it is seen running again
(attempts 2), the test cancels it.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import threading
import time

import httpx
import psutil
import pytest
import torch

from glassbox import CONFIG, LanguageModel
from glassbox.cli import start_server
from glassbox.offline import tiny_gpt2_path
from glassbox.remote import transport
from glassbox.remote.job import JobRequest
from job_requests import job_request, saved
from waiting import REQUEST, Not, cpu_hogs, wait_until

pytest.importorskip("ray")  # the [ray] extra

PROMPT = "The Eiffel Tower is in"
ECHO = "echo = glassbox.save(marker)\n"
SECRET = ("GLASSBOX_RAY_TEST_TOKEN", "not-for-replicas")  # in the server's environment only
# What it prints first arrives while it runs (output streams from the replica), and says that it
# is past being claimed and batched: jobs submitted from then on queue behind it. It runs until
# it is cancelled (or its replica dies).
FOREVER = "print('looping')\nn = 0\nwhile True:\n    n = n + 1\n"


def request(source: str, marker: str, model: str = "") -> JobRequest:
    """A job as the glassbox client sends it, for the tiny GPT-2 (served under its folder's name,
    which is what ``LanguageModel(path)`` asks a server for, unless ``model`` names another)."""
    return job_request(source, model=model or tiny_gpt2_path().name, values={"marker": marker},
                       inputs=[PROMPT], model_refs={}, modules={"glassbox": "glassbox"}, returns=("echo",),
                       filename="<remote block>")


def submit(url: str, key: str, source: str, marker: str, model: str = "") -> str:
    return transport.submit(url, key, request(source, marker, model), timeout=REQUEST)


def final(url: str, key: str, job: str) -> dict:
    def done() -> dict | None:
        state = transport.status(url, key, job)
        return state if state["status"] in transport.FINAL else None

    return wait_until(done, f"job {job} to finish")


def echoed(url: str, key: str, job: str) -> str:
    result = transport.result(url, key, job)
    assert result.ok, result.error
    return saved(result)["echo"]


def health(url: str, key: str | None = None) -> dict:
    """/v1/health; the replicas are listed only to a request with a valid key."""
    headers = {"X-API-Key": key} if key else {}
    return httpx.get(url + "/v1/health", headers=headers, timeout=REQUEST).json()


def until(condition, what: str):
    return wait_until(condition, what)


def running_again(url: str, key: str, job: str) -> dict:
    """The job's state once it runs a second time (its first run died with its replica)."""
    def again() -> dict | Not:
        state = transport.status(url, key, job)
        assert state["status"] not in transport.FINAL, state
        again = state["status"] == "RUNNING" and state["attempts"] == 2 and state["logs"] == "looping\n"
        return state if again else Not(state)

    return until(again, f"job {job} to run again")


def cancelled(url: str, key: str, job: str) -> None:
    transport.cancel(url, key, job)
    assert final(url, key, job)["status"] == "CANCELLED"


def loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or bool(ip.version == 6 and ip.ipv4_mapped and ip.ipv4_mapped.is_loopback)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture(scope="module")
def path() -> str:
    return str(tiny_gpt2_path())


@pytest.fixture(scope="module")
def name(path) -> str:
    return os.path.basename(path)


@pytest.fixture(scope="module")
def server(tmp_path_factory, path, name):
    os.environ[SECRET[0]] = SECRET[1]  # the server's environment has it; its replicas must not
    try:
        # The tiny GPT-2 twice: under its folder's name (two replicas) and as "twin" (one).
        state_dir = str(tmp_path_factory.mktemp("ray"))
        running = start_server({name: path, "twin": path}, state_dir=state_dir, args=[
            "--backend", "ray", "--isolation", "none", "--replicas", f"{name}=2",
            "--torch-threads", str(torch.get_num_threads()),
            "--max-seconds", "900",  # FOREVER jobs end when the tests cancel them
        ])
    finally:
        del os.environ[SECRET[0]]
    try:
        yield running
    finally:
        running.stop()
    assert running.process.returncode in (0, -signal.SIGTERM)
    assert "Traceback" not in running.output()


def test_replicas_give_the_values_of_a_local_run(server, path, name, monkeypatch):
    state = health(server.url, server.create_key("health"))
    assert state["backend"] == "ray" and state["worker"] == "ready"
    replicas = state["replicas"]
    assert [r["models"] for r in replicas] == [[name], [name], ["twin"]]
    assert all(r["state"] == "ready" and isinstance(r["pid"], int) for r in replicas)
    assert len({r["pid"] for r in replicas}) == 3
    served = httpx.get(server.url + "/v1/models", timeout=REQUEST).json()["models"]
    assert {m["name"]: m["replicas"] for m in served} == {name: 2, "twin": 1}
    assert "started a private Ray instance" in server.output()
    for replica in replicas:
        with open(f"/proc/{replica['pid']}/environ", "rb") as file:
            assert SECRET[1].encode() not in file.read()
        # At the server's priority, not Ray's nice 15 for workers: at 15, any busy process of the
        # machine starves the replicas (a killed one took minutes to come back on a loaded machine).
        assert os.getpriority(os.PRIO_PROCESS, replica["pid"]) == os.getpriority(os.PRIO_PROCESS,
                                                                                 server.process.pid)
    listening = set()
    for process in psutil.Process(server.process.pid).children(recursive=True):
        try:
            sockets = process.net_connections("inet")
            listening |= {c.laddr.ip for c in sockets if c.status == psutil.CONN_LISTEN}
        except psutil.NoSuchProcess:
            pass
    assert listening and all(loopback(ip) for ip in listening), listening

    model = LanguageModel(path)
    with model.trace(PROMPT):
        local_hidden = model.transformer.h[0].output[0].save()
        local_logits = model.output.logits.save()
    monkeypatch.setattr(CONFIG, "HOST", server.url)
    monkeypatch.setattr(CONFIG, "API_KEY", server.create_key("parity"))
    monkeypatch.setattr(CONFIG, "STATUS", False)
    for _ in range(3):  # on either replica
        with model.trace(PROMPT, remote=True):
            hidden = model.transformer.h[0].output[0].save()
            logits = model.output.logits.save()
        assert torch.equal(hidden, local_hidden) and torch.equal(logits, local_logits)
    twin = LanguageModel(path, remote_name="twin")
    with twin.trace(PROMPT, remote=True):
        logits = twin.output.logits.save()
    assert torch.equal(logits, local_logits)


def test_a_replica_killed_under_a_job_comes_back_and_the_job_runs_again(server):
    key = server.create_key("fault")
    long = submit(server.url, key, FOREVER, "long")
    until(lambda: transport.status(server.url, key, long)["logs"] == "looping\n", "the long job prints")
    busy = [(i, r) for i, r in enumerate(health(server.url, key)["replicas"]) if r["running"]]
    assert len(busy) == 1, busy  # the long job, nothing else
    index, replica = busy[0]
    assert replica["state"] == "ready"
    behind = [submit(server.url, key, ECHO, f"behind {i}") for i in range(4)]

    answers: list[float] = []
    failures: list[BaseException] = []
    polling = threading.Event()

    def poll() -> None:
        while not polling.is_set():
            started = time.monotonic()
            try:
                assert health(server.url)["status"] == "ok"
                answers.append(time.monotonic() - started)
            except BaseException as err:
                failures.append(err)
            time.sleep(0.05)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        os.kill(replica["pid"], signal.SIGKILL)
        running_again(server.url, key, long)  # on the other replica, or the killed one once back
        for i, job in enumerate(behind):
            assert final(server.url, key, job)["status"] == "COMPLETED"
            assert echoed(server.url, key, job) == f"behind {i}"
        back = until(lambda: (lambda r: r["state"] == "ready" and r["restarts"] >= 1 and r)(
            health(server.url, key)["replicas"][index]), "the killed replica is back")
    finally:
        polling.set()
        poller.join()
    assert not failures, failures[0]
    assert len(answers) > 10 and max(answers) < 5
    assert back["pid"] != replica["pid"] and gone(replica["pid"])
    assert f"died while running job {long}" in server.output()
    cancelled(server.url, key, long)
    # The restarted replica runs jobs like the others.
    jobs = [submit(server.url, key, ECHO, f"after {i}") for i in range(4)]
    for i, job in enumerate(jobs):
        assert final(server.url, key, job)["status"] == "COMPLETED"
        assert echoed(server.url, key, job) == f"after {i}"


def test_every_job_queued_behind_a_killed_replica_completes_on_a_busy_machine(server):
    """The one replica of "twin" runs a long job with ten jobs queued behind it, and is killed
    (SIGKILL of its actor's process) while two busy loops keep both cores of a small machine busy:
    the long job runs once more, and every queued job completes, however long the restart takes."""
    key = server.create_key("failover")
    with cpu_hogs(2):
        long = submit(server.url, key, FOREVER, "long", "twin")
        until(lambda: transport.status(server.url, key, long)["logs"] == "looping\n", "the long job prints")
        [(index, replica)] = [(i, r) for i, r in enumerate(health(server.url, key)["replicas"])
                              if r["models"] == ["twin"]]
        assert replica["running"] == 1 and replica["state"] == "ready", replica
        queued = [submit(server.url, key, ECHO, f"queued {i}", "twin") for i in range(10)]
        assert all(transport.status(server.url, key, job)["status"] == "QUEUED" for job in queued)
        os.kill(replica["pid"], signal.SIGKILL)
        killed = time.monotonic()
        running_again(server.url, key, long)  # first in line on the restarted replica
        again = time.monotonic() - killed
        cancelled(server.url, key, long)  # it would run forever: the ten behind it run now
        states = {job: final(server.url, key, job) for job in queued}
        took = time.monotonic() - killed
        assert all(state["status"] == "COMPLETED" for state in states.values()), (states, server.output())
        assert [echoed(server.url, key, job) for job in queued] == [f"queued {i}" for i in range(10)]
        back = until(lambda: (lambda r: r["state"] == "ready" and r["restarts"] >= 1 and r)(
            health(server.url, key)["replicas"][index]), "the killed replica is back")
    assert back["pid"] != replica["pid"] and gone(replica["pid"])
    assert f"died while running job {long}" in server.output()
    print(f"the killed job ran again {again:.0f} s, the ten behind it completed {took:.0f} s after the kill")


def test_queued_jobs_survive_a_killed_api_process(tmp_path, path, name):
    state_dir = str(tmp_path / "state")
    # One job at a time: the blocker reruns alone, first (batched with the queued jobs, which the
    # restarted server finds queued together, it would keep them running with it until cancelled).
    args = ["--backend", "ray", "--isolation", "none", "--torch-threads", "1", "--max-seconds", "900",
            "--max-batch", "1"]
    first = start_server({name: path}, state_dir=state_dir, args=args)
    try:
        key = first.create_key("dana")
        blocker = submit(first.url, key, FOREVER, "blocker")
        until(lambda: transport.status(first.url, key, blocker)["logs"] == "looping\n", "the blocker runs")
        queued = [submit(first.url, key, ECHO, f"q{i}") for i in range(4)]
        assert transport.status(first.url, key, queued[-1])["status"] == "QUEUED"
        replicas = [r["pid"] for r in health(first.url, key)["replicas"]]
        assert all(replicas)
    finally:
        first.kill()
    # The private Ray instance ends with the process that started it, and its replicas with it.
    until(lambda: all(gone(pid) for pid in replicas), "the old replicas exit")

    second = start_server({name: path}, state_dir=state_dir, args=args)
    try:
        assert "1 interrupted and queued again" in second.output()
        # The job that was running when the API process died runs again, from the start, first.
        running_again(second.url, key, blocker)
        assert all(transport.status(second.url, key, job)["status"] == "QUEUED" for job in queued)
        cancelled(second.url, key, blocker)
        for i, job in enumerate(queued):
            assert final(second.url, key, job)["status"] == "COMPLETED"
            assert echoed(second.url, key, job) == f"q{i}"
    finally:
        second.stop()
    assert second.process.returncode in (0, -signal.SIGTERM)
    assert "Traceback" not in second.output()


def test_a_replica_no_node_can_hold_stops_the_server_naming_the_resource(tmp_path, path, name):
    with pytest.raises(RuntimeError, match=r"glassbox serve exited") as err:
        start_server({name: path}, state_dir=str(tmp_path), args=[
            "--backend", "ray", "--isolation", "none", "--replica-resources", f"{name}=cpus:1,gpus:64"])
    message = str(err.value)
    assert "64 GPUs" in message and "--replica-resources" in message, message
