"""A real Ray cluster of several nodes on this machine, for tests: ``ray start`` processes on loopback.

Offers:
    RayCluster(root)                  a cluster whose files (sessions, logs, auth token) live in ``root``
      .add_node(cpus=1, gpus=0)       start a node (the first is the head); returns once the head knows it
      .address                        the head's GCS, 127.0.0.2:PORT (what ``--ray-address`` takes)
      .env                            what a driver (``glassbox serve``) needs in its environment to join
      .shutdown()                     SIGKILL every node's processes; returns once none is left
    RayNode                           one node: ``ray start --block``, in a process group of its own
      .ip / .node_id / .resources / .pids() / .kill()    kill(): this node's processes only, as a lost machine

    cluster = RayCluster("/tmp/short")  # Ray's socket paths under it must fit in 107 characters
    head, gpu_node = cluster.add_node(cpus=1), cluster.add_node(cpus=2, gpus=2)
    gpu_node.kill()                   # the head lives on; Ray declares the node dead a few seconds later

Layout::

    RayCluster.root/
      auth_token           a token of its own for Ray's token authentication (RAY_AUTH_MODE=token everywhere:
                           Ray 2.60's head turns it on by itself when ~/.ray/auth_token exists)
      session_*/logs/      every node's logs (gcs_server.out: which nodes registered)
      head.log, node1.log  what each ``ray start`` printed

- **One process group per node.** ``ray start --block`` stays in the foreground as the node's
  parent, and everything it starts (raylet, GCS on the head, agents, and through the raylet every
  worker and actor) stays in its process group, so ``kill()`` ends exactly one node, however Ray
  names its processes. ``ray stop`` cannot: it stops every Ray process of this machine, those of
  other tests included.
- **Loopback only, an address per node**: the head on 127.0.0.2, node *k* on 127.0.0.*k+2* (all of
  127/8 is loopback on Linux), so each node is told apart by its address as machines would be. Not
  127.0.0.1: Ray replaces that (and "localhost") with this machine's network address, in ``ray
  start`` and in a driver's ``--address`` alike. A driver that joins ``address`` attaches to the
  head (Ray prefers the head among the nodes it finds on its own machine).
  Ray's GCS and raylets still listen on every interface: hence the token (the cluster runs jobs).
- **Ports**: every port a node opens is chosen free beforehand (the GCS, the raylet, the agents,
  the dashboard that ``ray start --head`` starts anyway); workers take ports the OS chooses.
- **Node death** is noticed by the GCS's health checks of each raylet; the head here checks every
  second and gives up after 5 misses, so a killed node is declared dead within seconds (Ray's
  defaults: every 3 s, 5 misses). A check waits 10 s for its answer: a live raylet on a busy
  machine answers late, not never.
- **Waits** are on conditions (the log line, the registration, the processes gone), with limits of
  ``waiting.HANG`` that only stop hangs; a node whose ``ray start`` exits first fails at once,
  with its output.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
from pathlib import Path

import psutil

from waiting import HANG, ProcessDied, wait_until

_STARTS = 3  # tries at starting one worker node (see RayCluster.add_node)
_RAY_STARTUP_TIMEOUT = "timed out during startup"

__all__ = ["RayCluster", "RayNode"]

_RAY = [sys.executable, "-m", "ray.scripts.scripts"]  # the `ray` command of this interpreter's Ray
_OBJECT_STORE = 100 * 1024**2  # bytes per node: the jobs here pass no large objects through Ray
# A killed raylet refuses the check at once, so it is declared dead after 5 checks (about 5 s); a
# live one that is slow (this machine may be busy: CI, other tests) would have to leave 5 checks in
# a row unanswered for 10 s each.
_HEALTH_CHECKS = {"RAY_health_check_initial_delay_ms": "0", "RAY_health_check_period_ms": "1000",
                  "RAY_health_check_timeout_ms": "10000", "RAY_health_check_failure_threshold": "5"}


def _free_port() -> int:
    """A free loopback port, below the kernel's ephemeral range (glassbox.cli.free_port): the port is
    bound only later, and one of that range may meanwhile be taken by any outgoing connection."""
    from glassbox.cli import free_port

    return free_port()


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


class RayNode:
    """One node of a ``RayCluster``: a ``ray start --block`` process and all it started.

        node = cluster.add_node(cpus=2, gpus=2)
        node.ip, node.node_id, node.resources    # 127.0.0.3, Ray's id of the node, what it declares
        node.kill()                        # SIGKILL, as if the machine had lost power
    """

    def __init__(self, name: str, ip: str, process: subprocess.Popen, log_path: Path,
                 resources: dict[str, float]) -> None:
        self.name = name
        self.ip = ip
        self.process = process
        self.log_path = log_path
        self.resources = resources
        self.node_id = ""

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def pids(self) -> set[int]:
        """Every live process of this node: its process group, and the descendants of ``ray start``
        (in case Ray ever starts one in a session of its own)."""
        group = self.process.pid  # start_new_session: the group's id is ray start's pid
        found = set()
        for process in psutil.process_iter():
            try:
                if os.getpgid(process.pid) == group and process.status() != psutil.STATUS_ZOMBIE:
                    found.add(process.pid)
            except (OSError, psutil.Error):
                pass
        try:
            found |= {child.pid for child in psutil.Process(group).children(recursive=True)}
            found.add(group)
        except psutil.NoSuchProcess:
            pass
        return {pid for pid in found if not _gone(pid)}

    def kill(self, timeout: float | None = None) -> None:
        """SIGKILL every process of this node and wait until none is left (``timeout``: a limit
        for processes that never go, default ``waiting.HANG``)."""

        def none_left() -> bool:
            pids = self.pids()
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            return not pids

        wait_until(none_left, f"every process of {self.name} to end after SIGKILL", limit=timeout,
                   interval=0.1)
        self.process.wait(HANG if timeout is None else timeout)

    def _wait_started(self, timeout: float | None) -> None:
        wait_until(lambda: "Ray runtime started" in self.output(), f"ray start ({self.name}) to start",
                   limit=timeout, interval=0.1, process=self.process, output=self.output)

        def raylet() -> str:  # the raylet is started by then; its command line names the node
            for pid in self.pids():
                try:
                    process = psutil.Process(pid)
                    found = [a for a in process.cmdline() if a.startswith("--node_id=")]
                    if found and process.name() == "raylet":
                        return found[0].partition("=")[2]
                except psutil.Error:
                    continue
            return ""

        self.node_id = wait_until(raylet, f"the raylet of {self.name}", limit=timeout, interval=0.1,
                                  process=self.process, output=self.output)


class RayCluster:
    """A Ray cluster of ``ray start`` nodes on loopback (see the module docstring).

        cluster = RayCluster(tempfile.mkdtemp(prefix="gbray-", dir="/tmp"))
        try:
            cluster.add_node(cpus=1); cluster.add_node(cpus=2, gpus=2)
            start_server(..., args=["--backend", "ray", "--ray-address", cluster.address, ...])
        finally:
            cluster.shutdown()
    """

    def __init__(self, root: str | Path) -> None:
        # Unix socket paths live under root and may hold 107 characters: a short root of our own.
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.nodes: list[RayNode] = []
        self.port = _free_port()
        token = self.root / "auth_token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        # RAY_worker_niceness: the replicas (Ray workers) at the priority of everything else, not
        # Ray's nice 15, at which any busy process of a loaded machine starves them.
        self.env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
                    "RAY_USAGE_STATS_ENABLED": "0", "RAY_worker_niceness": "0"}

    @property
    def address(self) -> str:
        return f"127.0.0.2:{self.port}"

    @property
    def head(self) -> RayNode:
        return self.nodes[0]

    def add_node(self, *, cpus: float = 1, gpus: float = 0, timeout: float | None = None) -> RayNode:
        """Start a node declaring ``cpus`` and ``gpus`` (no device needed: Ray only counts them);
        the first one started is the head. Returns once the head has registered it (``timeout``:
        a limit for a node that never starts, default ``waiting.HANG``).

        ``ray start`` of a worker node gives up when the head does not know it within 30 s (a
        constant of Ray's, ``node.py``: "timed out during startup"), which a loaded shared machine
        can take: such a node is stopped and started again, up to ``_STARTS`` times."""
        for attempt in range(_STARTS):
            try:
                return self._start_node(cpus, gpus, timeout)
            except ProcessDied as died:
                if not self.nodes or attempt == _STARTS - 1 or _RAY_STARTUP_TIMEOUT not in str(died):
                    raise
                self.nodes.pop().kill(timeout)
        raise AssertionError("unreachable")

    def _start_node(self, cpus: float, gpus: float, timeout: float | None) -> RayNode:
        head = not self.nodes
        name = "head" if head else f"node{len(self.nodes)}"
        ip = f"127.0.0.{len(self.nodes) + 2}"
        command = [*_RAY, "start", "--block", "--node-ip-address", ip, "--temp-dir", str(self.root),
                   "--num-cpus", f"{cpus:g}", "--num-gpus", f"{gpus:g}",
                   "--object-store-memory", str(_OBJECT_STORE), "--disable-usage-stats",
                   "--min-worker-port", "0", "--max-worker-port", "0"]
        for flag in ("--node-manager-port", "--object-manager-port", "--metrics-export-port",
                     "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                     "--runtime-env-agent-port"):
            command += [flag, str(_free_port())]
        if head:
            command += ["--head", "--port", str(self.port), "--include-dashboard", "false",
                        "--dashboard-port", str(_free_port())]
        else:
            command += ["--address", self.address]
        env = {**os.environ, **self.env}
        if head:  # see the module docstring
            env.update(_HEALTH_CHECKS)
        log_path = self.root / f"{name}.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        node = RayNode(name, ip, process, log_path, {"CPU": float(cpus), "GPU": float(gpus)})
        self.nodes.append(node)
        node._wait_started(timeout)
        self._wait_registered(node, timeout)
        return node

    def _wait_registered(self, node: RayNode, timeout: float | None) -> None:
        """The GCS logs each node it registers; a driver that joins now sees this one."""
        pattern = re.compile(rf"Regist\w+ [\w ]*node\W.*{node.node_id}", re.IGNORECASE)

        def registered() -> bool:
            return any(pattern.search(path.read_text(errors="replace"))
                       for path in self.root.glob("session_*/logs/gcs_server.out"))

        wait_until(registered, f"the head to register {node.name} ({node.node_id})", limit=timeout,
                   interval=0.1, process=node.process, output=node.output)

    def shutdown(self) -> None:
        """Kill every node, the head last (so workers do not linger waiting for it)."""
        errors = []
        for node in reversed(self.nodes):
            try:
                node.kill()
            except AssertionError as err:  # wait_until gave up: some process outlived SIGKILL
                errors.append(str(err))
        if errors:
            raise RuntimeError("; ".join(errors))
