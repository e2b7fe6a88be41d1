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

__all__ = ["ServerConfig", "default_max_memory_bytes", "default_state_dir", "parse_model_spec"]


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


def _doc(text: str, **kwargs: object) -> dict:
    return {"metadata": {"doc": text}, **kwargs}


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
    state_dir: str = field(**_doc(
        "Directory for the job database (and nothing else). Default: $GLASSBOX_STATE_DIR, "
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
        "Largest result a job may return (the saved values, as sent back); a larger one fails the job."
    ), default=1024**3)
    max_seconds: float = field(**_doc(
        "Wall-clock limit of one job, from the moment the worker receives it. A job over it is "
        "killed together with the worker process, fails with 'exceeded the time limit', and the "
        "worker is restarted; the queue is kept."
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
        "Most printed output kept per job; later output is dropped with a note saying so."
    ), default=1024**2)
    rate_limit_per_minute: int = field(**_doc(
        "Most jobs one API key may submit per minute (a sliding window); more get 429. 0: no limit."
    ), default=120)
    max_jobs_per_key: int = field(**_doc(
        "Most jobs one API key may have queued or running at once; more get 429. 0: no limit."
    ), default=32)
    result_ttl_seconds: float = field(**_doc(
        "How long finished jobs (results, errors, logs) are kept before they are deleted."
    ), default=3600.0)
    torch_threads: int = field(**_doc(
        "torch intra-op threads in the worker, set once at its start so that numbers do not depend "
        "on what ran before. 0: torch's own default for this machine (what a local run uses too)."
    ), default=0)
    worker_start_timeout: float = field(**_doc(
        "Seconds the worker may take to start and load every model before the server gives up."
    ), default=600.0)
    backend: str = field(**_doc(
        "Where jobs run: 'local' (one worker process on this machine). Ray comes later."
    ), default="local")
    executor: str = field(**_doc(
        "Module the worker takes load_models() and run_job() from. Change only to test the "
        "server machinery or to plug in another executor."
    ), default="glassbox.server.execute")

    def __post_init__(self) -> None:
        if self.backend != "local":
            raise ValueError(f"backend {self.backend!r} is not available; this server offers 'local'")
        for name in ("max_request_bytes", "max_result_bytes", "max_saved_values", "max_log_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_seconds <= 0:
            raise ValueError(f"max_seconds must be positive, got {self.max_seconds}")
        for name in ("rate_limit_per_minute", "max_jobs_per_key", "torch_threads", "max_memory_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 (off / default) or positive, got {getattr(self, name)}")

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
