"""The ``ray`` backend: every model's replicas run as Ray actors, placed by Ray's scheduler.

Offers:
    RayBackend(config, say)     one server's connection to Ray (``pool.WorkerPool`` drives it)
      .channels()               one ``RayReplica`` per replica; touches no Ray yet
      .connect()                start a private Ray instance, or join the cluster at ``ray_address``
      .disconnect()             kill the replicas; leave Ray (a private instance stops with it)
    RayReplica                  the channel to one replica: what ``local.LocalProcess`` offers, and
                                .node ({"id", "ip"} of the Ray node it runs on)
    GlassboxReplica             the actor class (one model, jobs one at a time)

    glassbox serve --backend ray --model smollm2=DIR --replicas smollm2=2 --model gpt2=DIR \\
                   [--ray-address auto] [--replica-resources smollm2=cpus:1,gpus:0,memory:2GiB]

Layout::

    API process                                         Ray actor GlassboxReplica (one model)
    ───────────                                         ─────────────────────────────────────
    Feeder ── RayReplica                          max_concurrency=4 (threads):
      send(message, blob)   ── run.remote(frame) ──►      run: child.handle_message(...), one at a
      receive(timeout)      ◄── take.remote(1 s) ──         time (a lock); every log / result goes
        one take call outstanding at a time, kept           into an outbox as a framed message
        across receive() calls; returns the outbox        take: waits up to 1 s for the outbox,
        as a list of framed messages (bytes)                hands over all of it

- **Printed output streams** while a job runs: ``run`` and ``take`` execute on different threads of
  the actor, so ``take`` hands over a job's ``log`` messages as they are printed (within one
  round trip), and its ``result`` right after. ``alive()`` looks at the outstanding ``take`` too
  (without waiting), so a replica that died while idle is noticed and restarted before a job is
  given to it.
- **Restarts** are the feeder's: the actor is created with ``max_restarts=0``. When it dies (killed,
  crashed, out of memory, node lost) the pending ``take`` raises ``RayActorError``, the channel
  reports ``ChannelClosed``, and ``Feeder`` settles the job (a retry, ``crash_retries``) and
  calls ``start()`` again, which creates a fresh actor wherever the cluster has the resources now
  (a lost node's replicas move to the nodes left; ``node`` says where each runs, in /v1/health).
  Ray's own restarts would bring the actor back behind the feeder's back, replaying or dropping
  the method calls in flight, so the feeder could not tell which job died with it.
- **Isolation**: under ``--isolation process`` (the default) the actor holds no model and runs no
  user code: it spawns a worker process of its own and relays to it (``ray_relay.py``). Under
  ``none``, ``load`` loads the model in the actor (threads: ``torch_threads``, or Ray's
  ``OMP_NUM_THREADS`` when 0; ``RLIMIT_DATA``: ``max_memory_bytes``) and jobs run there. Either
  way the actor first scrubs its environment (``child.SENSITIVE_ENV``), and ``start()`` waits
  ``worker_start_timeout`` for the load; a request no node can ever meet fails at once, saying
  which resource and which flag to change.
- **Signals**: ``RAY_DISABLE_FAILURE_SIGNAL_HANDLER=1`` is set before Ray is imported (unless set
  already): Ray's crash handler would otherwise take SIGTERM from uvicorn, and a graceful stop
  (running jobs back to the queue) would become a crash.
- **Private Ray** (``ray_address`` empty): ``ray.init`` starts one in this process, sized so every
  replica fits (CPUs: the larger of this machine's count and the replicas' sum; GPUs: what Ray
  detects, since declaring GPUs that are not there would hand replicas device ids that do not
  exist), without the dashboard, without usage statistics, and bound to 127.0.0.1 only (Ray
  otherwise listens on every interface). ``ray.init`` runs on a thread of its own that lives until
  ``disconnect()``: Ray ties its processes' lives to the thread that started them (Linux's parent
  death signal), so they end with it, and with this process if it is killed. Environment
  variables that look like secrets are taken out of the environment while ``ray.init`` starts the
  Ray processes, which every replica inherits its environment from. If this process is killed
  (``kill -9``), Ray's processes and the replicas end with it; two of Ray's helper processes (its
  agents) may linger a few minutes before they notice. Its workers, the replicas, run at the
  server's priority (``RAY_worker_niceness=0``; at Ray's default, 15, any busy process of the
  machine starves them) and may take 10 minutes to register with Ray
  (``RAY_worker_register_timeout_seconds``; Ray's 60 s killed slow starts on a loaded machine);
  either variable, when set already, is kept.
- **Joining a cluster** (``ray_address``): every node that may hold a replica needs glassbox (and
  its dependencies) installed and the model folders at the same paths as this machine, and its
  ``ray start`` should have ``RAY_worker_niceness=0`` in its environment (else the replicas run
  at nice 15, and any busy process of the node starves them). The replicas' environment is the
  cluster's: they scrub it in-process, but what ``ray start`` was given stays visible in
  ``/proc``. ``disconnect()`` kills the replicas and leaves the cluster running.
- **Security note for operators.** Results travel as framed bytes (JSON + blob), and the channel
  accepts nothing else from the actor, but Ray unpickles every actor reply in this process first:
  code that took over an actor could attack the API process and the cluster through Ray. Under
  the default isolation no job runs in an actor; under ``none`` one that escaped the sandbox
  would. Give glassbox a Ray cluster of its own.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from ...remote.framing import frame, unframe
from ...remote.job import JobResult
from ...remote.protocol import ProtocolError
from ..config import ServerConfig
from .channel import ChannelClosed, WorkerStartError, ready_note
from .child import child_environment, handle_message, limit_memory, scrub_environment, start
from .ray_relay import WorkerRelay, worker_config

__all__ = ["GlassboxReplica", "RayBackend", "RayReplica"]

_TAKE_WAIT = 1.0  # seconds a take call waits in the actor for output before it returns empty-handed
_PLACE_NOTICE = 10.0  # seconds a replica may take to be placed and started before the log says so
_RESOURCES = (("num_cpus", "CPU", "cpus"), ("num_gpus", "GPU", "gpus"), ("memory", "memory", "memory"))
_GIB = 1024**3


# ================================================================ inside the Ray actor


class GlassboxReplica:
    """One replica of one model, as a Ray actor (``ray.remote`` is applied by ``RayBackend``, so
    that importing this module needs no Ray). Every method returns plain bytes or lists of bytes
    (``placed``: a list of an int and two strings), which ``RayReplica`` checks."""

    def __init__(self, specs: dict[str, str], executor: str, torch_threads: int,
                 max_memory_bytes: int, worker: ServerConfig | None = None) -> None:
        scrub_environment()
        self._specs = dict(specs)
        self._executor = executor
        self._torch_threads = int(torch_threads)
        # ``worker``: the model and its jobs go to a worker process of this actor's own, isolated as
        # the server says (ray_relay.py); None: --isolation none, every job in this process.
        self._relay = WorkerRelay(worker, self._put) if worker is not None else None
        self._limit = limit_memory(int(max_memory_bytes)) if worker is None else 0
        self._module: Any = None
        self._models: dict[str, Any] = {}
        self._outbox: collections.deque[bytes] = collections.deque()
        self._ready = threading.Condition()
        self._run_lock = threading.Lock()  # jobs run one at a time, after_job included

    def placed(self) -> list:
        """Where this replica runs: ``[pid, Ray's node id, the node's address]``."""
        import ray  # inside an actor, Ray is there

        return [os.getpid(), ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()]

    def load(self) -> bytes:
        """Load the model; a framed ``ready`` (with the description) or ``failed`` (why) message."""
        if self._relay is not None:
            return frame(self._relay.start())
        self._module, self._models, reply = start(self._executor, self._specs, self._torch_threads,
                                                  self._limit)
        return frame(reply)

    def run(self, request: bytes) -> None:
        """Run one framed ``job`` / ``batch`` message; its output goes to the outbox."""
        message, blob = unframe(request)
        if self._relay is not None:
            self._relay.send(message, blob)
            return
        answered: set[str] = set()

        def send(reply: dict, out: bytes = b"") -> None:
            if reply.get("op") == "result":
                answered.add(str(reply.get("job")))
            self._put(frame(reply, out))

        with self._run_lock:
            try:
                handle_message(self._module, self._models, message, blob, send, memory_limit=self._limit)
            except Exception as err:  # handle_message settles every job itself; this is a server bug
                ids = message.get("jobs") if message.get("op") == "batch" else [message.get("job")]
                for job_id in [str(j) for j in ids or []]:
                    if job_id not in answered:
                        failed = JobResult.failed("InternalError",
                                                  f"the server failed to run this job: {err!r}")
                        send({"op": "result", "job": job_id, "result": failed.envelope()})

    def _put(self, data: bytes) -> None:
        with self._ready:
            self._outbox.append(data)
            self._ready.notify_all()

    def take(self, wait: float) -> list[bytes]:
        """Everything sent since the last call, waiting up to ``wait`` seconds for something."""
        with self._ready:
            if not self._outbox:
                self._ready.wait(wait)
            taken = list(self._outbox)
            self._outbox.clear()
        return taken


# ================================================================ in the API process


class RayBackend:
    """One server's use of Ray (see the module docstring).

        backend = RayBackend(config, say)
        channels = backend.channels()     # before connect(): no Ray yet
        backend.connect()
        ...
        backend.disconnect()
    """

    def __init__(self, config: ServerConfig, say: Callable[[str], None]) -> None:
        self.config = config
        self.say = say
        self.ray: Any = None
        self.actor_class: Any = None
        self.private = not config.ray_address
        self._replicas: list[RayReplica] = []
        self._keeper: threading.Thread | None = None
        self._leave = threading.Event()
        self._owns_connection = False

    def request(self, model: str) -> dict[str, float]:
        """What one replica of ``model`` asks Ray for (``--replica-resources``; default 1 CPU)."""
        asked = dict(self.config.replica_resources.get(model) or {})
        request = {"num_cpus": float(asked.get("num_cpus", 1.0)),
                   "num_gpus": float(asked.get("num_gpus", 0.0))}
        if asked.get("memory"):
            request["memory"] = float(asked["memory"])
        return request

    def channels(self) -> list[RayReplica]:
        self._replicas = [RayReplica(self, name, index)
                          for name in self.config.models
                          for index in range(int(self.config.replicas.get(name, 1)))]
        return list(self._replicas)

    # ------------------------------------------------------------ connect / disconnect

    def connect(self) -> None:
        """Start a private Ray instance (``ray_address`` empty) or join a cluster; raise
        ``WorkerStartError`` saying why not."""
        if self.ray is not None:
            return
        # Ray's C++ core would otherwise install a crash handler that also takes SIGTERM, so that a
        # graceful stop (uvicorn's, which puts running jobs back in the queue) became a crash.
        os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
        if self.private:
            # Read by Ray when it is imported: without it, Ray binds its node to this machine's
            # network address (every interface) even when told 127.0.0.1.
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            # Read by the raylet: Ray starts its workers (every replica, and the worker a replica
            # spawns) at nice 15 unless told otherwise. The replicas are this server's work: at 15,
            # any busy process of the machine starves them, and a replica restarting after a crash
            # took minutes to load on a loaded machine while its queued jobs waited. 0: the
            # priority of the server itself.
            os.environ.setdefault("RAY_worker_niceness", "0")
            # A worker must register with the raylet within this many seconds or Ray kills it and
            # starts another (default 60): on a busy machine a start can take longer, and each
            # retry would start over. start() has its own limit (worker_start_timeout).
            os.environ.setdefault("RAY_worker_register_timeout_seconds", "600")
        try:
            import ray
        except ImportError as err:
            raise WorkerStartError(f"--backend ray needs Ray, which cannot be imported here ({err}): "
                                   "pip install 'glassbox[ray]'") from None
        if ray.is_initialized():  # whoever embeds the server already connected this process
            self.ray, self.actor_class = ray, ray.remote(GlassboxReplica)
            self.say(f"using this process's Ray connection: {self._describe_cluster()}")
            return
        if self.private:
            self.say("starting a private Ray instance (127.0.0.1 only)...")
        else:
            self.say(f"joining the Ray cluster at {self.config.ray_address}...")
        outcome: dict[str, Any] = {}
        settled = threading.Event()
        self._leave.clear()
        self._keeper = threading.Thread(target=self._keep, args=(ray, outcome, settled), name="glassbox-ray",
                                        daemon=True)
        self._keeper.start()
        settled.wait()
        if "error" in outcome:
            self._keeper.join(10)
            self._keeper = None
            if self.private:
                raise WorkerStartError(f"could not start a private Ray instance: {outcome['error']}")
            raise WorkerStartError(
                f"could not join the Ray cluster at {self.config.ray_address!r}: {outcome['error']}\n"
                "Is Ray running there (`ray start --head`)? Check --ray-address ('auto' for the cluster "
                "on this machine, host:6379 or ray://host:10001 for a remote head; empty for a private "
                "instance).")
        self.ray, self.actor_class, self._owns_connection = ray, ray.remote(GlassboxReplica), True
        if self.private:
            self.say(f"started a private Ray instance: {self._describe_cluster()}")
            exposed = [node.get("NodeManagerAddress") for node in ray.nodes()
                       if node.get("NodeManagerAddress") not in ("127.0.0.1", None)]
            if exposed:  # Ray was imported before connect() could tell it to stay on loopback
                self.say(f"warning: the private Ray instance listens on {exposed[0]}, not only on 127.0.0.1")
            self._check_private_fits()
        else:
            self.say(f"joined Ray cluster at {self.config.ray_address}: {self._describe_cluster()}")

    def _keep(self, ray: Any, outcome: dict, settled: threading.Event) -> None:
        """The thread that starts Ray, lives while it is used, and shuts it down."""
        try:
            if self.private:
                # The Ray processes started now (and through them every replica) inherit this
                # environment: no secrets and the workers' defaults, as for the local backend's
                # worker. Ray's own settings (RAY_*) stay.
                with child_environment(keep=lambda name: name.startswith("RAY_")):
                    ray.init(**self._init_options())
            else:
                ray.init(**self._init_options())
        except BaseException as err:
            outcome["error"] = f"{type(err).__name__}: {err}"
            settled.set()
            return
        settled.set()
        self._leave.wait()
        try:
            ray.shutdown()
        except Exception:
            self.say(f"could not leave Ray cleanly:\n{traceback.format_exc()}")

    def _init_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"log_to_driver": False, "configure_logging": True,
                                   "logging_level": logging.ERROR}
        if not self.private:
            options["address"] = self.config.ray_address
            return options
        wanted = sum(self.request(name)["num_cpus"] * int(self.config.replicas.get(name, 1))
                     for name in self.config.models)
        options.update(num_cpus=max(os.cpu_count() or 1, math.ceil(wanted)), include_dashboard=False,
                       _node_ip_address="127.0.0.1")
        return options

    def _describe_cluster(self) -> str:
        total = self.ray.cluster_resources()
        nodes = [node for node in self.ray.nodes() if node.get("Alive")]
        text = (f"{len(nodes)} node(s), {total.get('CPU', 0):g} CPUs, {total.get('GPU', 0):g} GPUs, "
                f"{total.get('memory', 0) / _GIB:.1f} GiB memory for tasks")
        logs = _logs_dir(self.ray)
        return text + (f" (Ray's logs: {logs})" if logs else "")

    def _check_private_fits(self) -> None:
        """A private instance gets no more nodes: if the replicas cannot all fit, say so now."""
        total = self.ray.cluster_resources()
        for key, ray_name, flag in _RESOURCES:
            wanted = sum(self.request(name).get(key, 0.0) * int(self.config.replicas.get(name, 1))
                         for name in self.config.models)
            if wanted > total.get(ray_name, 0.0) + 1e-9:
                self.disconnect()
                raise WorkerStartError(
                    f"the replicas ask for {_amount(key, wanted)} in all, and this machine offers Ray "
                    f"{_amount(key, total.get(ray_name, 0.0))}: lower {flag} in --replica-resources or the "
                    "number of --replicas, or join a larger cluster with --ray-address")

    def disconnect(self) -> None:
        """Kill every replica and leave Ray (a private instance stops; a cluster goes on)."""
        for replica in self._replicas:
            replica.kill()
        keeper, self._keeper = self._keeper, None
        if keeper is not None:
            self._leave.set()
            keeper.join(60)
        self.ray = self.actor_class = None

    # ------------------------------------------------------------ placement

    def infeasible(self, model: str) -> str | None:
        """Why no node of the cluster can ever hold a replica of ``model`` (None: one can)."""
        request = self.request(model)
        nodes = [node.get("Resources") or {} for node in self.ray.nodes() if node.get("Alive")]
        for key, ray_name, flag in _RESOURCES:
            wanted = request.get(key, 0.0)
            best = max((node.get(ray_name, 0.0) for node in nodes), default=0.0)
            if wanted > best + 1e-9:
                where = ("this machine offers Ray" if self.private
                         else "the largest node of the Ray cluster has")
                return (f"a replica of {model} asks Ray for {_amount(key, wanted)} and {where} "
                        f"{_amount(key, best)}: change {flag} in --replica-resources {model}=..."
                        + ("" if self.private else ", or add a node that has it"))
        return None

    def shortfall(self, model: str) -> str:
        """What a replica of ``model`` asks for against what the cluster has free now."""
        request = self.request(model)
        free = self.ray.available_resources()
        parts = [f"{_amount(key, request[key])} (free now: {_amount(key, free.get(ray_name, 0.0))})"
                 for key, ray_name, _ in _RESOURCES if request.get(key)]
        return ", ".join(parts)


class RayReplica:
    """The channel to one Ray replica of one model; offers what ``local.LocalProcess`` offers."""

    def __init__(self, backend: RayBackend, model: str, index: int) -> None:
        self.backend = backend
        self.config = backend.config
        self.model = model
        self.index = index
        self.serves = [model]
        self.can_abort = False  # a job runs inside the actor: stopping it means killing the actor
        self.pid: int | None = None
        self.node: dict[str, str] | None = None  # {"id": Ray's node id, "ip": its address}; /v1/health
        self._actor: Any = None
        self._poll: Any = None  # the outstanding take call
        self._inbox: collections.deque[tuple[dict, bytes]] = collections.deque()
        self._reason = ""

    @property
    def label(self) -> str:
        return f"replica {self.model}#{self.index}" + (f" (pid {self.pid})" if self.pid else "")

    # ------------------------------------------------------------ life

    def start(self, stopping: threading.Event) -> dict:
        backend, config = self.backend, self.config
        ray = backend.ray
        if ray is None:
            raise WorkerStartError("the server is not connected to Ray")
        why = backend.infeasible(self.model)
        if why:
            raise WorkerStartError(why)
        self.kill()
        self._reason = ""
        options = {key: value for key, value in backend.request(self.model).items() if value}
        options.setdefault("num_cpus", 0.0)  # cpus:0 asked for: left out, Ray would reserve 1
        worker = None if config.isolation == "none" else worker_config(config, self.model)
        actor = backend.actor_class.options(max_restarts=0, max_task_retries=0, max_concurrency=4,
                                            **options).remote(
            {self.model: config.models[self.model]}, config.executor, config.torch_threads,
            config.max_memory_bytes, worker)
        self._actor = actor
        placed_ref, load_ref = actor.placed.remote(), actor.load.remote()
        started = time.monotonic()
        deadline = started + config.worker_start_timeout
        noticed = False
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    if self.pid is None:
                        raise WorkerStartError(
                            f"Ray did not place {self.label} within {config.worker_start_timeout:g} s "
                            f"(worker_start_timeout): it asks for {backend.shortfall(self.model)}. Free "
                            f"those resources, or lower --replica-resources {self.model}=... or --replicas")
                    raise WorkerStartError(f"{self.label} did not load {self.model} within "
                                           f"{config.worker_start_timeout:g} s (worker_start_timeout)")
                waiting = [ref for ref in (placed_ref, load_ref) if ref is not None]
                ready, _ = ray.wait(waiting, num_returns=1, timeout=min(remaining, 0.5))
                if stopping.is_set():
                    raise WorkerStartError("the server is stopping")
                if placed_ref is not None and placed_ref in ready:
                    self._placed(ray.get(placed_ref))
                    placed_ref = None
                    backend.say(f"{self.label}: loading {self.model} on node {self.node['ip']} "
                                f"({self.node['id'][:12]})")
                    continue
                if load_ref in ready:
                    message, _ = unframe(_only_bytes(ray.get(load_ref)))
                    if message.get("op") != "ready":
                        raise WorkerStartError(str(message.get("error") or message))
                    if self.pid is None:
                        self._placed(ray.get(actor.placed.remote()))
                    return {**message, "note": ready_note(message)}
                if self.pid is None and not noticed and time.monotonic() - started > _PLACE_NOTICE:
                    noticed = True
                    backend.say(f"{self.label}: still waiting for Ray to place and start it; it asks "
                                f"for {backend.shortfall(self.model)}")
        except WorkerStartError:
            self.kill()
            raise
        except ray.exceptions.RayError as err:
            label = self.label
            self.kill()
            raise WorkerStartError(f"{label} died while loading {self.model}: {_death(err)}") from None
        except ProtocolError as err:
            self.kill()
            raise WorkerStartError(f"{self.label} sent a malformed answer while loading: {err}") from None

    def alive(self) -> bool:
        if self._actor is None:
            return False
        ray = self.backend.ray
        if ray is None:
            return False
        try:
            if self._poll is None:
                self._poll = self._actor.take.remote(_TAKE_WAIT)
            ready, _ = ray.wait([self._poll], timeout=0)
            if ready:
                self._collect()
        except ChannelClosed:
            return False
        return self._actor is not None and not self._reason

    def kill(self) -> None:
        actor, self._actor = self._actor, None
        self._poll = None
        self._inbox.clear()
        self.pid = self.node = None
        ray = self.backend.ray
        if actor is not None and ray is not None:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # already gone, or Ray is gone: nothing left to kill
                pass

    def _placed(self, placed: Any) -> None:
        if not (isinstance(placed, list) and len(placed) == 3 and isinstance(placed[0], int)
                and all(isinstance(part, str) for part in placed[1:])):
            raise ProtocolError(f"placed returned {type(placed).__name__}, not [pid, node id, address]")
        self.pid, self.node = placed[0], {"id": placed[1], "ip": placed[2]}

    def exit_reason(self) -> str:
        return self._reason or "the Ray actor is gone (reason unknown)"

    # ------------------------------------------------------------ messages

    def send(self, message: dict, blob: bytes = b"") -> None:
        if self._actor is None or self._reason:
            raise ChannelClosed("no Ray actor")
        try:
            self._actor.run.remote(frame(message, blob))
        except Exception as err:  # Ray refuses the call: the actor or the connection is gone
            self._reason = self._reason or f"Ray refused the call: {err}"
            raise ChannelClosed(str(err)) from None

    def receive(self, timeout: float) -> tuple[dict, bytes] | None:
        if self._inbox:
            return self._inbox.popleft()
        if self._actor is None or self._reason:
            raise ChannelClosed("no Ray actor")
        ray = self.backend.ray
        if self._poll is None:
            self._poll = self._actor.take.remote(_TAKE_WAIT)
        ready, _ = ray.wait([self._poll], timeout=max(0.0, timeout))
        if ready:
            self._collect()
        return self._inbox.popleft() if self._inbox else None

    def _collect(self) -> None:
        """Move what the finished take call brought into the inbox; ChannelClosed if the actor died."""
        ray = self.backend.ray
        ref, self._poll = self._poll, None
        try:
            taken = ray.get(ref)
        except ray.exceptions.RayError as err:
            self._reason = _death(err)
            raise ChannelClosed(self._reason) from None
        try:
            if not isinstance(taken, list):
                raise ProtocolError(f"take returned {type(taken).__name__}, not a list")
            for data in taken:
                self._inbox.append(unframe(_only_bytes(data)))
        except ProtocolError as err:
            self._reason = f"the replica sent a malformed message ({err})"
            raise ChannelClosed(self._reason) from None


def _only_bytes(data: Any) -> bytes:
    if not isinstance(data, bytes):
        raise ProtocolError(f"expected bytes from the replica, got {type(data).__name__}")
    return data


def _death(err: BaseException) -> str:
    """Why a Ray actor died, in a line: Ray's own explanation without its list of common causes,
    and the exception that ended it when it died of one (an error in ``__init__``)."""
    text = str(err)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reason = next((line for start in ("The actor is dead because", "The actor died because")
                   for line in lines if line.startswith(start)), lines[0] if lines else type(err).__name__)
    reason = reason.split(" Some common causes")[0].strip()
    if "Traceback" in text and lines[-1] not in reason:
        reason += f" ({lines[-1]})"
    return f"the Ray actor died: {reason[:500]}"


def _amount(key: str, value: float) -> str:
    if key == "memory":
        return f"{value / _GIB:.1f} GiB of memory"
    return f"{value:g} {'CPUs' if key == 'num_cpus' else 'GPUs'}"


def _logs_dir(ray: Any) -> str | None:
    node = getattr(getattr(ray, "_private", None), "worker", None)
    node = getattr(node, "_global_node", None)
    try:
        return str(node.get_logs_dir_path()) if node is not None else None
    except Exception:  # a convenience for the log line only
        return None

