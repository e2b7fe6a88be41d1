"""The ``ray`` backend on a real two-node Ray cluster (``ray_cluster.RayCluster``: ``ray start``
processes on loopback, GPUs declared, none needed), ``glassbox serve --ray-address`` in a subprocess.

Placement by resources: a replica that asks for a GPU runs on the node that declares GPUs (its
process is that node's), a CPU-only one stays on the CPU node, and jobs run on both; a replica no
node can hold stops the server, naming the model, the resource and the amounts. Node loss: with a
replica on each node and a job running on each, every process of one node is killed; the job that
ran there runs once more, the queued jobs and those submitted during the outage complete, the
server answers throughout, and the lost replica is re-created on the surviving node.

The jobs running when the node is killed never end on their own (FOREVER): a job of a fixed number
of steps raced the test, which must see both running and kill the node before they end, however
busy the machine is. Once the lost one is seen running again (attempts 2), both are cancelled.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
import time

import httpx
import pytest
from ray_cluster import RayCluster

from glassbox.cli import RunningServer, start_server
from glassbox.offline import tiny_gpt2_path
from glassbox.remote import transport
from job_requests import job_request, saved
from waiting import REQUEST, Not, wait_until

pytest.importorskip("ray")  # the [ray] extra

PROMPT = "The Eiffel Tower is in"
ECHO = "echo = glassbox.save(marker)\n"
# What it prints first says that it runs (and is past being claimed); the loop keeps it running
# while its node is killed, until the test cancels it.
FOREVER = "print('looping')\nn = 0\nwhile True:\n    n = n + 1\n"


def submit(url: str, key: str, source: str, marker: str, model: str = "") -> str:
    """A job as the glassbox client sends it, for the tiny GPT-2 (served under its folder's name)."""
    request = job_request(source, model=model or tiny_gpt2_path().name, values={"marker": marker},
                          inputs=[PROMPT], model_refs={}, modules={"glassbox": "glassbox"}, returns=("echo",),
                          filename="<remote block>")
    return transport.submit(url, key, request, timeout=REQUEST)


def until(condition, what: str):
    return wait_until(condition, what)


def final(url: str, key: str, job: str) -> dict:
    return until(lambda: (lambda s: s["status"] in transport.FINAL and s)(transport.status(url, key, job)),
                 f"job {job} to finish")


def echoed(url: str, key: str, job: str) -> str:
    result = transport.result(url, key, job)
    assert result.ok, result.error
    return saved(result)["echo"]


def replicas(url: str, key: str) -> list[dict]:
    return httpx.get(url + "/v1/health", headers={"X-API-Key": key}, timeout=REQUEST).json()["replicas"]


def serve(cluster: RayCluster, state_dir: str, args: list[str]) -> RunningServer:
    """``glassbox serve --backend ray --ray-address <cluster>`` serving the tiny GPT-2, with what a
    driver needs to join (the cluster's auth token) in its environment."""
    saved = {name: os.environ.get(name) for name in cluster.env}
    os.environ.update(cluster.env)
    try:
        return start_server({tiny_gpt2_path().name: str(tiny_gpt2_path())}, state_dir=state_dir, args=[
            "--backend", "ray", "--isolation", "none", "--ray-address", cluster.address,
            "--torch-threads", "1", "--max-seconds", "900", *args])  # 900: only for a job that hangs
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def stopped(server: RunningServer) -> None:
    server.stop()
    assert server.process.returncode in (0, -signal.SIGTERM)
    assert "Traceback" not in server.output()


@pytest.fixture
def make_cluster():
    """``make_cluster((cpus, gpus), ...)``: a cluster of those nodes (the first is the head), all
    killed at the end, whatever happened."""
    clusters: list[RayCluster] = []

    def make(*nodes: tuple[float, float]) -> RayCluster:
        # Ray's socket paths must fit in 107 characters: a short folder, not pytest's tmp_path.
        cluster = RayCluster(tempfile.mkdtemp(prefix="gbray-", dir="/tmp"))
        clusters.append(cluster)
        for cpus, gpus in nodes:
            cluster.add_node(cpus=cpus, gpus=gpus)
        return cluster

    yield make
    for cluster in clusters:
        cluster.shutdown()
        assert not any(node.pids() for node in cluster.nodes)
        shutil.rmtree(cluster.root, ignore_errors=True)


def test_replicas_are_placed_by_their_resources(make_cluster, tmp_path):
    name = tiny_gpt2_path().name
    cluster = make_cluster((1, 0), (2, 2))  # a CPU head, a node with two GPUs
    head, gpu_node = cluster.nodes
    # No node has 3 CPUs (the cluster has 3 in all): the server does not start, and says why.
    with pytest.raises(RuntimeError, match=r"glassbox serve exited") as refused:
        serve(cluster, str(tmp_path / "refused"), ["--replica-resources", f"{name}=cpus:3"])
    message = str(refused.value)
    assert (f"a replica of {name} asks Ray for 3 CPUs and the largest node of the Ray cluster has 2 CPUs"
            in message and "--replica-resources" in message), message

    server = serve(cluster, str(tmp_path / "placed"), [
        "--model", f"twin={tiny_gpt2_path()}", "--replica-resources", f"{name}=cpus:1,gpus:1",
        "--replica-resources", "twin=cpus:1"])
    try:
        assert f"joined Ray cluster at {cluster.address}: 2 node(s), 3 CPUs, 2 GPUs" in server.output()
        key = server.create_key("placement")
        placed = replicas(server.url, key)
        assert sorted(r["models"] for r in placed) == sorted([[name], ["twin"]])
        assert all(r["state"] == "ready" for r in placed)
        for replica in placed:
            # A GPU asked for: only the GPU node has one. CPU-only: Ray keeps it off GPU nodes
            # while another node can hold it.
            node = gpu_node if replica["models"] == [name] else head
            assert replica["node"] == {"id": node.node_id, "ip": node.ip}, replica
            assert replica["pid"] in node.pids()  # the actor is a process of that node

        jobs = {submit(server.url, key, ECHO, f"echo {i}", model): f"echo {i}"  # on both nodes
                for i, model in enumerate([name, "twin", name, "twin"])}
        for job, marker in jobs.items():
            assert final(server.url, key, job)["status"] == "COMPLETED"
            assert echoed(server.url, key, job) == marker
    finally:
        stopped(server)


def test_a_lost_node_s_replica_is_re_created_on_the_other_and_its_job_runs_again(make_cluster, tmp_path):
    name = tiny_gpt2_path().name
    # Two GPU nodes; the head can hold both replicas, node 1 one. Ray fills the head (the driver's
    # node) to half and then spreads, so each node gets one.
    cluster = make_cluster((2, 2), (1, 1))
    head, lost = cluster.nodes
    server = serve(cluster, str(tmp_path / "state"), [
        "--replicas", f"{name}=2", "--replica-resources", f"{name}=cpus:1,gpus:1", "--max-batch", "1"])
    try:
        key = server.create_key("node-loss")
        before = replicas(server.url, key)
        assert sorted(r["node"]["ip"] for r in before) == [head.ip, lost.ip], before
        [(index, doomed)] = [(i, r) for i, r in enumerate(before) if r["node"]["ip"] == lost.ip]

        longs = [submit(server.url, key, FOREVER, f"long {i}") for i in range(2)]
        until(lambda: all(transport.status(server.url, key, job)["logs"] == "looping\n" for job in longs),
              "both long jobs run")
        assert [r["running"] for r in replicas(server.url, key)] == [1, 1]  # one on each node
        queued = [submit(server.url, key, ECHO, f"queued {i}") for i in range(3)]

        answers: list[dict] = []
        failures: list[BaseException] = []
        polling = threading.Event()

        def poll() -> None:
            while not polling.is_set():
                try:
                    answers.append(httpx.get(server.url + "/v1/health", timeout=REQUEST).json())
                except BaseException as err:
                    failures.append(err)
                time.sleep(0.05)

        poller = threading.Thread(target=poll)
        poller.start()
        try:
            lost.kill()  # every process of node 1: its raylet, its agents, the replica
            during = [submit(server.url, key, ECHO, f"during {i}") for i in range(3)]

            def rerun() -> dict | Not:  # the lost node's job, running again on the head
                states = {job: transport.status(server.url, key, job) for job in longs}
                assert not any(s["status"] in transport.FINAL for s in states.values()), states
                again = [job for job, s in states.items()
                         if s["status"] == "RUNNING" and s["attempts"] == 2 and s["logs"] == "looping\n"]
                return states if again else Not(states)

            states = until(rerun, "the lost node's job to run again")
            assert sorted(s["attempts"] for s in states.values()) == [1, 2], states
            [retried] = [job for job, s in states.items() if s["attempts"] == 2]
            for job in longs:  # they would run forever: the queue runs once they end
                transport.cancel(server.url, key, job)
                assert final(server.url, key, job)["status"] == "CANCELLED"
            for prefix, jobs in (("queued", queued), ("during", during)):
                for i, job in enumerate(jobs):
                    assert final(server.url, key, job)["status"] == "COMPLETED"
                    assert echoed(server.url, key, job) == f"{prefix} {i}"
            back = until(lambda: (lambda r: r["state"] == "ready" and r["restarts"] >= 1 and r)(
                replicas(server.url, key)[index]), "the lost replica is re-created")
        finally:
            polling.set()
            poller.join()
        assert not failures, failures[0]
        assert len(answers) > 10 and all(a["status"] == "ok" for a in answers)
        assert f"{doomed['label']} died while running job {retried}" in server.output()
        assert back["node"] == {"id": head.node_id, "ip": head.ip} and back["pid"] in head.pids(), back
        assert all(r["node"]["ip"] == head.ip for r in replicas(server.url, key))
        # The re-created replica takes jobs like the other.
        jobs = [submit(server.url, key, ECHO, f"after {i}") for i in range(4)]
        for i, job in enumerate(jobs):
            assert final(server.url, key, job)["status"] == "COMPLETED"
            assert echoed(server.url, key, job) == f"after {i}"
    finally:
        stopped(server)
