"""Every knob of a glassbox server, with what it does and its default.

Offers:
    ServerConfig            a dataclass of all settings; each field's ``metadata["doc"]`` explains it
    default_state_dir()     where keys and jobs live unless told otherwise
    default_max_memory_bytes()   the worker's memory limit unless told otherwise (60% of this machine's)
    parse_model_spec(text)  "name=path" -> (name, path), with a clear error

    config = ServerConfig(models={"gpt2": "/models/gpt2"}, max_seconds=60)
    print(config.database_url())        # sqlite:///.../glassbox.db unless db_url is set

``glassbox serve`` turns every field into a command-line flag (``--max-seconds``)
and uses the doc string as its help, so the two can never drift apart.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from .catalog import ENGINES, LOAD_MODES, CatalogError, parse_size, read_catalog

__all__ = ["ServerConfig", "default_max_memory_bytes", "default_state_dir", "parse_model_spec",
           "parse_replica_resources"]


ISOLATIONS = ("process", "process-unconfined", "none")


def default_state_dir() -> Path:
    """``$GLASSBOX_STATE_DIR``, else ``~/.glassbox/server``."""
    env = os.environ.get("GLASSBOX_STATE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".glassbox" / "server"


def _machine_memory() -> int | None:
    """Bytes of memory this process may use: physical memory, or a smaller container (cgroup) limit."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = None
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as file:
                text = file.read().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < (total or 2**62):  # "max" / a huge number: no limit
            total = int(text)
    return total


def default_max_memory_bytes() -> int:
    """60% of the memory this machine (or its container) has: room for the API process, the OS
    and page cache, while a job that asks for more fails cleanly instead of waking the OOM killer.
    0 (no limit) where the amount cannot be read."""
    total = _machine_memory()
    return int(total * 0.6) if total else 0


def parse_model_spec(text: str) -> tuple[str, str]:
    """Split ``name=path`` (as given to ``--model``) into its parts."""
    name, sep, path = text.partition("=")
    name, path = name.strip(), path.strip()
    if not sep or not name or not path:
        raise ValueError(f"--model takes NAME=PATH (for example gpt2=/models/gpt2), got {text!r}")
    if not name.replace("-", "_").replace(".", "_").isidentifier():
        raise ValueError(
            f"model name {name!r} must be letters, digits, '-', '_' or '.', starting with a letter"
        )
    return name, path


_UNITS = {"kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4, "kb": 1000, "mb": 1000**2,
          "gb": 1000**3, "b": 1}


def parse_replica_resources(text: str) -> tuple[str, dict[str, float]]:
    """``NAME=cpus:2,gpus:0.5,memory:4GiB`` (as given to ``--replica-resources``) -> the model
    name and its Ray resource request ``{"num_cpus": 2.0, "num_gpus": 0.5, "memory": 4294967296.0}``."""
    name, sep, spec = text.partition("=")
    usage = "--replica-resources takes NAME=cpus:N,gpus:N,memory:SIZE (for example smollm2=cpus:1,gpus:0.5)"
    if not sep or not name.strip() or not spec.strip():
        raise ValueError(f"{usage}, got {text!r}")
    keys = {"cpus": "num_cpus", "gpus": "num_gpus", "memory": "memory"}
    request: dict[str, float] = {}
    for part in spec.split(","):
        key, colon, value = part.strip().partition(":")
        if not colon or key.strip() not in keys:
            raise ValueError(f"{usage}; {part.strip()!r} is not cpus:N, gpus:N or memory:SIZE")
        value = value.strip().lower()
        unit = next((u for u in sorted(_UNITS, key=len, reverse=True) if value.endswith(u)), "")
        try:
            number = float(value[: len(value) - len(unit)] if unit else value) * (_UNITS[unit] if unit else 1)
        except ValueError:
            raise ValueError(f"{usage}; {value!r} is not a number") from None
        if number < 0:
            raise ValueError(f"{usage}; {key.strip()} cannot be negative")
        request[keys[key.strip()]] = number
    return name.strip(), request


def _doc(text: str, *, cli: bool = True, size: bool = False, **kwargs: object) -> dict:
    """A field's metadata: its ``doc`` (the flag's help), whether it is a flag (``cli``), whether
    the flag takes a size such as 16GiB (``size``)."""
    return {"metadata": {"doc": text, "cli": cli, "size": size}, **kwargs}


@dataclass
class ServerConfig:
    """Settings of one glassbox server (API process + one worker process).

        config = ServerConfig(models={"tiny": "/tmp/tiny-gpt2"}, port=0)
        assert config.limits()["max_seconds"] == config.max_seconds
    """

    host: str = field(**_doc(
        "Interface to listen on. The default accepts connections from this machine only; "
        "use 0.0.0.0 to serve a network (put TLS in front of it: API keys travel in headers)."
    ), default="127.0.0.1")
    port: int = field(**_doc("TCP port to listen on."), default=8765)
    models: dict[str, str] = field(**_doc(
        "Models to serve, name -> path of a directory that transformers' from_pretrained loads "
        "(or a hub id, if the server may download). Given as --model name=path, repeatable."
    ), default_factory=dict)
    models_file: str = field(**_doc(
        "A model catalog (TOML, README: Running a server): each model's path, dtype, device_map, "
        "max_memory, offload_folder, ..., load = 'eager' or 'on_demand', pinned, replicas, resources; "
        "and [server] settings. Flags given on the command line win over the file."
    ), default="")
    memory_budget: int = field(**_doc(
        "What the worker may take on this host (bytes, or a size such as 16GiB), by `glassbox plan`'s "
        "peak: the process, every model it holds and one job of 128 tokens. A job for a cold "
        "(on_demand) model loads it, first evicting the least recently used unpinned models to stay "
        "under. 0: no budget (nothing is evicted).",
        size=True
    ), default=0)
    model_settings: dict[str, dict] = field(**_doc(
        "Per model, from the catalog: {'options': LanguageModel options, 'load': 'eager' | "
        "'on_demand', 'pinned': bool, 'engine': 'hf' | 'vllm'}. Not a flag: use --models-file.", cli=False
    ), default_factory=dict)
    vllm_python: str = field(**_doc(
        "The Python interpreter of the worker processes that serve engine = 'vllm' models (a virtualenv "
        "with vLLM and glassbox, e.g. .venv-vllm/bin/python made by scripts/setup_vllm.sh). Default: this "
        "server's own interpreter if it can import vLLM, else .venv-vllm/bin/python of the checkout when "
        "glassbox runs from one (src/ layout) and it exists, else this interpreter. An installed glassbox "
        "(a wheel) has no checkout: give the vLLM virtualenv's Python here."
    ), default="")
    state_dir: str = field(**_doc(
        "Directory for the job database and this server's instance id files. Default: $GLASSBOX_STATE_DIR, "
        "else ~/.glassbox/server. `glassbox keys` must use the same one to manage this server's keys."
    ), default="")
    db_url: str = field(**_doc(
        "SQLAlchemy database URL for keys and jobs, e.g. postgresql+psycopg://user@host/glassbox. "
        "Default: $GLASSBOX_DB_URL, else sqlite:///<state_dir>/glassbox.db."
    ), default="")
    max_request_bytes: int = field(**_doc(
        "Largest request body accepted (code plus the values it reads, framed); larger ones get 413."
    ), default=256 * 1024**2)
    max_result_bytes: int = field(**_doc(
        "Most bytes one job may make the server keep and send back: its result (tensors and the "
        "strings, numbers and lists it saved, as framed), its error and its printed output together. "
        "A larger result fails the job; printed output is cut to fit, with a note."
    ), default=1024**3)
    max_seconds: float = field(**_doc(
        "Wall-clock limit of one job, from the moment the worker receives it. A job over it fails "
        "with 'exceeded the time limit': its own process is killed (--isolation process), or, "
        "with --isolation none, the worker process, which restarts; the queue is kept."
    ), default=300.0)
    max_memory_bytes: int = field(**_doc(
        "Memory limit of the worker process, models included (RLIMIT_DATA: its private writable "
        "memory). An allocation over it fails the job with 'exceeded the worker memory limit' and "
        "the worker goes on. Default: 60 percent of this machine's memory. 0: no limit."
    ), default=default_max_memory_bytes())
    max_saved_values: int = field(**_doc(
        "Most values one job may save and send back."
    ), default=10_000)
    max_log_bytes: int = field(**_doc(
        "Most printed output kept per job (UTF-8 bytes); later output is dropped with a note saying so. "
        "It counts against max_result_bytes and the key's stored-bytes quota too."
    ), default=1024**2)
    max_error_bytes: int = field(**_doc(
        "Longest error message kept per job (UTF-8 bytes); a longer one is cut, with a note saying how "
        "much was cut and naming this setting. It counts against max_result_bytes and the quota too."
    ), default=64 * 1024)
    max_request_json_bytes: int = field(**_doc(
        "Largest JSON part of a request: the block's source and the description of the values it "
        "reads (tensors travel apart, counted by max_request_bytes only). Larger ones get 413. It "
        "bounds what the API process parses per request."
    ), default=4 * 1024**2)
    rate_limit_per_minute: int = field(**_doc(
        "Most jobs one API key may submit per minute (a sliding window); more get 429. 0: no limit."
    ), default=120)
    max_jobs_per_key: int = field(**_doc(
        "Most jobs one API key may have queued or running at once; more get 429. 0: no limit."
    ), default=32)
    max_stored_bytes_per_key: int = field(**_doc(
        "Most bytes one API key's finished jobs may hold on the server (results, errors and printed "
        "output, kept until they expire, result_ttl_seconds after they finish): a key at or over it "
        "gets 429 on submit, and a job whose output would bring its key over it ends with "
        "QuotaExceeded, its output not kept. 0: no quota."
    ), default=2 * 1024**3)
    result_ttl_seconds: float = field(**_doc(
        "How long finished jobs (results, errors, logs) are kept before they are deleted."
    ), default=3600.0)
    torch_threads: int = field(**_doc(
        "torch intra-op threads in the worker, set once at its start so that numbers do not depend "
        "on what ran before. 0: torch's own default in the worker (OMP_NUM_THREADS when set, else its "
        "core count): what a local run uses too. Results carry the count; a client whose own "
        "count differs is told so (CPU kernels split work by thread count: the last bits differ)."
    ), default=0)
    worker_start_timeout: float = field(**_doc(
        "Seconds the worker may take to start and load every model before the server gives up."
    ), default=600.0)
    max_batch: int = field(**_doc(
        "Co-tenant batching: most jobs run together in ONE batched forward pass. Concurrent plain "
        "traces of the same model whose blocks can share a pass (no tracer calls, no gradients, "
        "the same trace arguments) each run as their own invoke on their own rows, with results "
        "equal to running alone. 1 turns batching off."
    ), default=16)
    batch_scope: str = field(**_doc(
        "Whose jobs may share a forward pass: 'any' (any API keys; each request works on a copy of "
        "its own rows, see the README's Security) or 'key' (only jobs of the same API key: a "
        "request that escaped the sandbox could then reach only its own key's rows)."
    ), default="any")
    batch_window_ms: float = field(**_doc(
        "How long a worker that has taken a job waits for compatible jobs to join its batch, while "
        "jobs arrive together (others were waiting when it took this one, or its last pass was "
        "shared). A job that comes alone to an idle worker starts at once; under load the queue "
        "already holds the batch."
    ), default=5.0)
    batch_wait_always: bool = field(**_doc(
        "Wait batch_window_ms after taking any job that could share a pass, even one that came "
        "alone (for tests and benchmarks that queue the jobs of one batch one by one)."
    ), default=False)
    crash_retries: int = field(**_doc(
        "How many more times a job runs after the process running it (its own, the worker or a "
        "replica) died under it (killed, crashed, out of memory) before it fails with WorkerCrashed."
    ), default=1)
    backend: str = field(**_doc(
        "Where jobs run: 'local' (one worker process on this machine holding every model) or "
        "'ray' (each model's replicas run as Ray actors placed by Ray's scheduler)."
    ), default="local")
    ray_address: str = field(**_doc(
        "With --backend ray: the cluster to join ('auto': the one `ray start` runs on this "
        "machine; 'ray://host:10001' or 'host:6379': a remote head). Empty: start a private Ray "
        "instance inside this server process, sized to the replicas' requests."
    ), default="")
    replicas: dict[str, int] = field(**_doc(
        "With --backend ray: replicas of a model, each a Ray actor holding its own copy; given as "
        "--replicas NAME=N, repeatable. Models not named get 1."
    ), default_factory=dict)
    replica_resources: dict[str, dict[str, float]] = field(**_doc(
        "With --backend ray: what one replica of a model asks Ray for, given as --replica-resources "
        "NAME=cpus:2,gpus:1,memory:4GiB, repeatable (memory in bytes or with KiB/MiB/GiB). "
        "Default: 1 CPU, no GPU, no memory reservation."
    ), default_factory=dict)
    executor: str = field(**_doc(
        "Module the worker takes load_models() and run_job() from (the contract: server/jobs/executor.py). "
        "Change only to test the server machinery or to plug in another executor."
    ), default="glassbox.server.jobs.executor")
    isolation: str = field(**_doc(
        "How jobs are kept apart (README: Security). 'process': each job or batch runs in a fresh "
        "process, forked from the worker's zygote and confined by the OS (Landlock + seccomp); the "
        "worker refuses to start on a kernel without them. With --backend ray each replica runs such "
        "a worker of its own. 'process-unconfined': the same, confined as far as the kernel allows. "
        "'none': every job runs in the process that holds the model (the worker, or the Ray actor), "
        "weights checked after each."
    ), default="process")

    share_weights: str = field(**_doc(
        "A folder on each machine (made if missing, mode 0700) where a model's weights become one "
        "read-only file that every replica or server process holding the same weights on that machine "
        "maps: two Ray replicas of a model on one node hold one copy in memory, not two. Files are "
        "named by their content, compared byte for byte before they are shared, and removed when no "
        "process maps them. Needs --isolation process or process-unconfined. CPU weights only (a GPU "
        "holds its own). Empty: each process holds a private copy."
    ), default="")

    def __post_init__(self) -> None:
        if self.backend not in ("local", "ray"):
            raise ValueError(f"backend {self.backend!r} is not available; choose 'local' or 'ray'")
        if self.batch_scope not in ("any", "key"):
            raise ValueError(f"batch_scope {self.batch_scope!r} is not available; choose 'any' or 'key'")
        if self.isolation not in ISOLATIONS:
            raise ValueError(f"isolation {self.isolation!r} is not available; choose one of {ISOLATIONS}")
        self._check_catalog()
        if self.share_weights and self.isolation == "none":
            raise ValueError("--share-weights needs --isolation process (or process-unconfined): under "
                             "'none' jobs run in the process that holds the model, and one that escaped the "
                             "sandbox could make the shared file writable and change the weights of "
                             "every replica on the machine")
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be 1 (batching off) or more, got {self.max_batch}")
        if self.batch_window_ms < 0:
            raise ValueError(f"batch_window_ms must be 0 or more, got {self.batch_window_ms}")
        for name, count in self.replicas.items():
            if name not in self.models:
                raise ValueError(f"--replicas names {name!r}, which is not served "
                                 f"(add --model {name}=PATH)")
            if int(count) < 1:
                raise ValueError(f"--replicas {name}={count}: a model needs at least 1 replica")
        for name in self.replica_resources:
            if name not in self.models:
                raise ValueError(f"--replica-resources names {name!r}, which is not served")
        if self.backend == "local" and any(int(n) > 1 for n in self.replicas.values()):
            raise ValueError("--replicas needs --backend ray (the local backend runs one worker process)")
        for name in ("max_request_bytes", "max_result_bytes", "max_saved_values", "max_log_bytes",
                     "max_error_bytes", "max_request_json_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_seconds <= 0:
            raise ValueError(f"max_seconds must be positive, got {self.max_seconds}")
        for name in ("rate_limit_per_minute", "max_jobs_per_key", "max_stored_bytes_per_key",
                     "torch_threads", "max_memory_bytes", "crash_retries"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 (off / default) or positive, got {getattr(self, name)}")

    def _check_catalog(self) -> None:
        if isinstance(self.memory_budget, str):
            self.memory_budget = parse_size(self.memory_budget, "memory_budget")
        if self.memory_budget < 0:
            raise ValueError(f"memory_budget must be 0 (no budget) or positive, got {self.memory_budget}")
        for name, settings in self.model_settings.items():
            if name not in self.models:
                raise ValueError(f"model_settings names {name!r}, which is not served")
            unknown = set(settings) - {"options", "load", "pinned", "engine"}
            if unknown:
                raise ValueError(f"model_settings[{name!r}] has unknown keys {sorted(unknown)}")
            if settings.get("load", "eager") not in LOAD_MODES:
                raise ValueError(f"model {name!r}: load = {settings['load']!r}; choose one of "
                                 f"{list(LOAD_MODES)}")
        for name in self.models:
            if self.engine(name) not in ENGINES:
                raise ValueError(f"model {name!r}: engine {self.engine(name)!r}; choose one of "
                                 f"{list(ENGINES)}")
        vllm = [n for n in self.models if self.engine(n) == "vllm"]
        for name in vllm:
            if self.load_mode(name) != "eager":
                raise ValueError(f"model {name!r}: engine 'vllm' models load at start (load = 'eager')")
        if vllm and self.backend == "ray":
            raise ValueError(f"engine 'vllm' ({', '.join(vllm)}) needs --backend local: each vLLM model runs "
                             "in a local worker process of its own (docs/vllm.md)")
        on_demand = [n for n in self.models if self.load_mode(n) == "on_demand"]
        if on_demand and self.backend == "ray":
            raise ValueError(f"load = 'on_demand' ({', '.join(on_demand)}) needs --backend local: a Ray "
                             "replica holds its model for its whole life (use replicas and resources)")

    def load_options(self, name: str) -> dict:
        """The LanguageModel options a model is loaded with (dtype, device_map, ...); {} by default."""
        return dict((self.model_settings.get(name) or {}).get("options") or {})

    def load_mode(self, name: str) -> str:
        """'eager' (loaded when the worker starts) or 'on_demand' (at its first job)."""
        return str((self.model_settings.get(name) or {}).get("load", "eager"))

    def engine(self, name: str) -> str:
        """'hf' (transformers, in the shared worker) or 'vllm' (a worker process of its own)."""
        return str((self.model_settings.get(name) or {}).get("engine", "hf"))

    def vllm_interpreter(self) -> str:
        """The Python that runs vLLM workers (``vllm_python``, else see its doc)."""
        import importlib.util
        import sys

        if self.vllm_python:
            return str(Path(self.vllm_python).expanduser())
        if importlib.util.find_spec("vllm") is not None:
            return sys.executable
        # From a checkout (<root>/src/glassbox/server/config.py): scripts/setup_vllm.sh's venv at its
        # root. An installed glassbox (site-packages/glassbox/...) has no checkout to look beside.
        package = Path(__file__).resolve().parents[1]
        root = package.parents[1]
        beside = root / ".venv-vllm" / "bin" / "python"
        from_checkout = package.parent.name == "src" and (root / "pyproject.toml").is_file()
        return str(beside) if from_checkout and beside.exists() else sys.executable

    def pinned(self, name: str) -> bool:
        """Whether an on-demand server may evict the model to make room for another."""
        return bool((self.model_settings.get(name) or {}).get("pinned", False))

    def worker_specs(self, names: list[str] | None = None) -> dict[str, dict]:
        """What a worker loads, by model: ``{"path": ..., "options": {...}}`` (executor.load_models)."""
        specs = {name: {"path": self.models[name], "options": self.load_options(name)}
                 for name in (self.models if names is None else names)}
        for name, spec in specs.items():
            if self.engine(name) != "hf":
                spec["engine"] = self.engine(name)
            elif self.share_weights:
                spec["share_weights"] = str(Path(self.share_weights).expanduser())
        return specs

    @classmethod
    def from_catalog(cls, path: str, **given: object) -> ServerConfig:
        """A config from the catalog at ``path`` (catalog.read_catalog), with ``given`` values (the
        command line's) winning over its [server] table; ``given["models"]`` add to its models."""
        catalog = read_catalog(path)
        settings = {f.name for f in cls.fields() if f.metadata.get("cli", True)}
        settings -= {"models", "models_file", "replicas", "replica_resources"}
        for key in catalog.server:
            if key not in settings:
                raise CatalogError(f"{path}: [server] {key!r} is not a server setting; the settings are "
                                   "those of `glassbox serve --help` by their names (memory_budget, "
                                   "max_seconds, ...)")
        values: dict = {**catalog.server, **given, "models_file": str(path)}
        values["models"] = {**{n: e.path for n, e in catalog.models.items()},
                            **dict(given.get("models") or {})}
        values["model_settings"] = {n: {"options": e.options, "load": e.load, "pinned": e.pinned,
                                        **({"engine": e.engine} if e.engine != "hf" else {})}
                                    for n, e in catalog.models.items()}
        values["replicas"] = {**{n: e.replicas for n, e in catalog.models.items() if e.replicas != 1},
                              **dict(given.get("replicas") or {})}
        values["replica_resources"] = {**{n: e.resources for n, e in catalog.models.items() if e.resources},
                                       **dict(given.get("replica_resources") or {})}
        return cls(**values)

    def state_path(self) -> Path:
        return Path(self.state_dir).expanduser() if self.state_dir else default_state_dir()

    def database_url(self) -> str:
        if self.db_url:
            return self.db_url
        env = os.environ.get("GLASSBOX_DB_URL")
        if env:
            return env
        return f"sqlite:///{self.state_path() / 'glassbox.db'}"

    def limits(self) -> dict:
        """What the worker passes to ``run_job`` for every job."""
        return {
            "max_seconds": self.max_seconds,
            "max_result_bytes": self.max_result_bytes,
            "max_saved_values": self.max_saved_values,
        }

    @classmethod
    def fields(cls) -> list[dataclasses.Field]:
        return list(dataclasses.fields(cls))
