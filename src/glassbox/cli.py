"""The ``glassbox`` command.

Offers:
    main(argv=None) -> exit code      the console script (``glassbox ...``, ``python -m glassbox.cli ...``)
    start_server(models, state_dir=...) -> RunningServer   ``glassbox serve`` as a loopback subprocess,
                                      returned once it answers (for demos and tests)
    free_port()                       a TCP port free on 127.0.0.1 right now

Commands::

    glassbox serve --model smollm2=/models/smollm2 [--model gpt2=...] [--host 127.0.0.1] [--port 8765]
                   [--state-dir DIR] [--max-seconds 300] ...     every ServerConfig field is a flag
    glassbox keys create --name alice     prints the new key once (only its hash is stored)
    glassbox keys create ops --operator   a key that sees the whole server on the dashboard at /
    glassbox keys list                    id, name, role, created, revoked
    glassbox keys revoke NAME_OR_ID
    glassbox models [--host URL]          what a server serves
    glassbox plan catalog.toml [--gpu-memory 80GiB] [--gpus N] [--tokens 128] [--batch 1]
                                          size a catalog (server/plan.py, server/sizing.py)
    glassbox jobs list | status | logs | result | cancel     your jobs on a server (jobs_cli.py)

``keys`` works on the server's database directly (``--state-dir`` / ``--db-url``, the same
defaults as ``serve``), so it runs on the server machine, while the server runs or not.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from .jobs_cli import add_jobs_parser
from .server.catalog import parse_size
from .server.config import ServerConfig, parse_model_spec, parse_replica_resources
from .server.sizing import DEFAULT_BATCH, DEFAULT_TOKENS

__all__ = ["RunningServer", "free_port", "main", "start_server"]


def _say(text: str) -> None:
    print(f"[glassbox] {text}", file=sys.stderr, flush=True)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_config_flags(parser: argparse.ArgumentParser, names: Sequence[str] | None = None) -> None:
    """One flag per ServerConfig field (or those in ``names``), documented by the field's doc."""
    for item in ServerConfig.fields():
        if names is not None and item.name not in names:
            continue
        doc = item.metadata.get("doc", "")
        if not item.metadata.get("cli", True):
            continue
        if item.name in _REPEATED:
            flag, metavar = _REPEATED[item.name]
            parser.add_argument(flag, dest=item.name, action="append", default=[], metavar=metavar, help=doc)
            continue
        default = item.default if item.default is not dataclasses.MISSING else None
        if isinstance(default, bool):  # a switch: given means on
            parser.add_argument(_flag(item.name), dest=item.name, action="store_true", default=None,
                                help=f"{doc} (default: {'on' if default else 'off'})")
            continue
        kind = parse_size if item.metadata.get("size") else {int: int, float: float}.get(type(default), str)
        parser.add_argument(_flag(item.name), dest=item.name, type=kind, default=None,
                            metavar=item.name.upper(), help=f"{doc} (default: {default!r})")


def _config(args: argparse.Namespace) -> ServerConfig:
    values: dict[str, Any] = {}
    for item in ServerConfig.fields():
        value = getattr(args, item.name, None)
        if item.name == "models":
            if value:
                specs = dict(parse_model_spec(text) for text in value)
                # Absolute paths: the worker may run with another working directory.
                values["models"] = {name: (os.path.abspath(path) if os.path.exists(path) else path)
                                    for name, path in specs.items()}
        elif item.name == "replicas":
            values["replicas"] = dict(_parse_replicas(text) for text in value or [])
        elif item.name == "replica_resources":
            values["replica_resources"] = dict(parse_replica_resources(text) for text in value or [])
        elif value is not None:
            values[item.name] = value
    if values.get("models_file"):
        return ServerConfig.from_catalog(values.pop("models_file"), **values)
    return ServerConfig(**values)


# The ServerConfig fields given as a repeatable NAME=VALUE flag: (flag, metavar).
_REPEATED = {"models": ("--model", "NAME=PATH"), "replicas": ("--replicas", "NAME=N"),
             "replica_resources": ("--replica-resources", "NAME=cpus:N,gpus:N,memory:SIZE")}


def _parse_replicas(text: str) -> tuple[str, int]:
    name, sep, count = text.partition("=")
    if not sep or not name.strip() or not count.strip().isdigit():
        raise ValueError(f"--replicas takes NAME=N (for example smollm2=2), got {text!r}")
    return name.strip(), int(count)


# ---------------------------------------------------------------- serve


def _serve(args: argparse.Namespace) -> int:
    try:
        config = _config(args)
    except ValueError as err:
        _say(str(err))
        return 2
    if not config.models:
        _say("no models to serve: give at least one --model NAME=PATH")
        return 2
    try:
        import uvicorn

        from .server.api.app import create_app
    except ImportError as err:
        _say(f"the server needs its extra dependencies ({err.name} is missing): "
             "pip install 'glassbox[server]'")
        return 2
    started = time.monotonic()
    _say(f"state: {config.database_url()}")
    _say(f"loading models: {', '.join(f'{n} ({p})' for n, p in config.models.items())}")
    app = create_app(config, say=_say)

    class _Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            if self.started:
                port = config.port
                try:  # the port actually bound (--port 0 picks a free one)
                    port = self.servers[0].sockets[0].getsockname()[1]
                except (AttributeError, IndexError, OSError):
                    pass
                ready = time.monotonic() - started
                _say(f"listening on http://{config.host}:{port} (ready in {ready:.1f} s); "
                     "create a key with `glassbox keys create --name NAME`")

    # timeout_keep_alive: longer than a client keeps an idle connection (httpx: 5 s, glassbox's
    # transport less), so that a client never sends on a connection the server is closing that
    # moment (a reset, which a busy machine makes likely at uvicorn's default of 5 s).
    # ws_per_message_deflate off: results are mostly float tensors, which zlib cannot shrink but
    # spent about a third of the API process's time on under load (bench/throughput.py).
    server = _Server(uvicorn.Config(app, host=config.host, port=config.port, log_level=args.log_level,
                                    access_log=args.access_log, ws="websockets-sansio", lifespan="on",
                                    timeout_keep_alive=_KEEP_ALIVE_SECONDS, ws_per_message_deflate=False))
    server.run()
    if not server.started:
        _say("the server did not start (see above)")
        return 1
    return 0


# ---------------------------------------------------------------- plan


def _plan(args: argparse.Namespace) -> int:
    from .server.plan import plan

    try:
        config = ServerConfig.from_catalog(args.catalog)
        result = plan(config, gpu_memory=args.gpu_memory, gpus=args.gpus, tokens=args.tokens,
                      batch=args.batch)
    except ValueError as err:
        _say(str(err))
        return 2
    print(result.table())
    return 0 if result.fits else 1


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


# ---------------------------------------------------------------- keys


def _store(args: argparse.Namespace) -> Any:
    from .server.store import JobStore

    config = ServerConfig(state_dir=args.state_dir or "", db_url=args.db_url or "")
    return JobStore(config.database_url())


def _when(stamp: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp)) if stamp else "-"


def _keys(args: argparse.Namespace) -> int:
    store = _store(args)
    try:
        if args.keys_command == "create":
            if not (args.name or args.key_name):
                raise ValueError("give the key a name: `glassbox keys create NAME` (who or what uses it)")
            info, key = store.create_key(args.name or args.key_name, operator=args.operator)
            print(key)
            _say(f"created key {info.id} for {info.name!r}. It is shown only this once: give it to its "
                 "user, who sets glassbox.CONFIG.API_KEY or GLASSBOX_API_KEY to it")
        elif args.keys_command == "list":
            keys = store.list_keys()
            if not keys:
                _say("no keys yet: create one with `glassbox keys create --name NAME`")
            rows = [("ID", "NAME", "ROLE", "CREATED", "REVOKED")]
            rows += [(k.id, k.name, "operator" if k.operator else "user", _when(k.created), _when(k.revoked))
                     for k in keys]
            _table(rows)
        elif args.keys_command == "revoke":
            revoked = store.revoke_key(args.name_or_id)
            if not revoked:
                _say(f"no active key with id or name {args.name_or_id!r}")
                return 1
            for info in revoked:
                _say(f"revoked key {info.id} ({info.name!r})")
        return 0
    except ValueError as err:
        _say(str(err))
        return 2
    finally:
        store.close()


# ---------------------------------------------------------------- models


def _models(args: argparse.Namespace) -> int:
    from .errors import RemoteError
    from .remote.transport import models

    host = args.host or os.environ.get("GLASSBOX_HOST") or "http://127.0.0.1:8765"
    key = args.api_key or os.environ.get("GLASSBOX_API_KEY")
    try:
        served = models(host, key)
    except RemoteError as err:
        _say(str(err))
        return 1
    if not key:  # the server tells a caller without a key only what it serves
        _say("status, class and parameters are shown with an API key (--api-key or GLASSBOX_API_KEY)")
    rows = [("NAME", "STATUS", "CLASS", "PARAMETERS")]
    for entry in served:
        params = entry.get("parameters")
        rows.append((str(entry.get("name")), str(entry.get("status", "")), str(entry.get("class", "")),
                     f"{params:,}" if isinstance(params, int) else ""))
    _table(rows)
    return 0


def _table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


# ---------------------------------------------------------------- a server in the background


# Limits that only stop hangs: a server on a busy machine may take minutes to load or to stop.
_HANG_SECONDS = 15 * 60.0
_STOP_SECONDS = 5 * 60.0
_KEEP_ALIVE_SECONDS = 30  # how long the server keeps an idle client connection open


class RunningServer:
    """A ``glassbox serve`` subprocess on loopback (what demos and tests embed).

        with start_server({"gpt2": path}, state_dir=tmp) as server:
            print(server.url)             # http://127.0.0.1:<free port>
            key = server.create_key("alice")
    """

    def __init__(self, process: Any, url: str, state_dir: str, log_path: str, db_url: str = "") -> None:
        self.process = process
        self.url = url
        self.state_dir = state_dir
        self.db_url = db_url  # the --db-url it was given, if any
        self.log_path = log_path

    def output(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as file:
            return file.read()

    def create_key(self, name: str) -> str:
        from .server.store import JobStore

        store = JobStore(ServerConfig(state_dir=self.state_dir, db_url=self.db_url).database_url())
        try:
            return store.create_key(name)[1]
        finally:
            store.close()

    def kill(self) -> None:
        """SIGKILL, as a crash or the OOM killer would: nothing gets to clean up."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(_HANG_SECONDS)

    def stop(self, timeout: float = _STOP_SECONDS) -> None:
        """A graceful stop (SIGTERM): running jobs go back to the queue. SIGKILL only if it has not
        exited after ``timeout`` seconds (a limit for a hung shutdown: a busy machine may take
        minutes to stop a server, a Ray one most of all)."""
        import subprocess

        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_port() -> int:
    """A TCP port nothing listens on, on 127.0.0.1, chosen below the kernel's range of ephemeral
    ports when it can be: a server binds its port only once its models are loaded, minutes later
    on a busy machine, and a port of that range may meanwhile be taken by any outgoing connection
    of the machine (the OS picks those ports from it), so that the server would fail to start."""
    import random
    import socket

    low = 32768
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as ranges:
            low = int(ranges.read().split()[0])
    except (OSError, ValueError, IndexError):
        pass
    candidates = random.sample(range(20000, low), min(50, max(0, low - 20000))) if low > 20000 else []
    for port in candidates:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(models: dict[str, str], *, state_dir: str, port: int | None = None,
                 args: Sequence[str] = (), timeout: float | None = None,
                 python: str | None = None) -> RunningServer:
    """Start ``python -m glassbox.cli serve`` on 127.0.0.1 and return once it answers /v1/health
    (its models are loaded by then). Output goes to ``<state_dir>/server.log``. ``python``: another
    virtualenv's interpreter to run it with (this one's by default).

    It waits for the server, not for a time: it returns as soon as /v1/health answers and raises at
    once, with the server's output, if the server exits first. ``timeout`` (default
    ``$GLASSBOX_START_TIMEOUT``, else 15 minutes) only stops a server that hangs: loading models on
    a busy machine can take minutes."""
    import subprocess

    import httpx

    os.makedirs(state_dir, exist_ok=True)
    port = port or free_port()
    command = [python or sys.executable, "-m", "glassbox.cli", "serve", "--host", "127.0.0.1",
               "--port", str(port), "--state-dir", state_dir, *args]
    for name, path in models.items():
        command += ["--model", f"{name}={path}"]
    log_path = os.path.join(state_dir, "server.log")
    with open(log_path, "ab") as log:
        env = {**os.environ, "VIRTUAL_ENV": os.path.dirname(os.path.dirname(python))} if python else None
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=env)
    db_url = next((args[i + 1] for i, arg in enumerate(args[:-1]) if arg == "--db-url"), "")
    server = RunningServer(process, f"http://127.0.0.1:{port}", state_dir, log_path, db_url)
    if timeout is None:
        timeout = float(os.environ.get("GLASSBOX_START_TIMEOUT") or _HANG_SECONDS)
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if process.poll() is not None:
            raise RuntimeError(f"glassbox serve exited with {process.returncode}:\n{server.output()}")
        try:
            # A slow answer is an answer still on its way: wait for it rather than ask again.
            if httpx.get(server.url + "/v1/health", timeout=30).status_code == 200:
                return server
        except httpx.HTTPError:
            pass  # not listening yet (refused), or reset while it starts: ask again
        time.sleep(0.1)
    server.kill()
    raise RuntimeError(f"glassbox serve did not answer /v1/health within {timeout:g} s (a limit for a "
                       f"server that hangs; GLASSBOX_START_TIMEOUT sets it):\n{server.output()}")


# ---------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glassbox", description="glassbox: serve models for remote=True "
                                     "traces, manage API keys, list served models.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run a glassbox server",
                                description="Serve models to remote=True traces.")
    _add_config_flags(serve)
    serve.add_argument("--log-level", default="warning", help="uvicorn's log level (default: warning)")
    serve.add_argument("--access-log", action="store_true", help="log every HTTP request")
    serve.set_defaults(run=_serve)

    keys = commands.add_parser("keys", help="create, list and revoke API keys",
                               description="Manage the API keys of the server that uses this state dir.")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    for name, help_text in (("create", "create a key (printed once)"), ("list", "list keys"),
                            ("revoke", "revoke a key by id, or every key with this name")):
        sub = key_commands.add_parser(name, help=help_text)
        _add_config_flags(sub, ("state_dir", "db_url"))
        if name == "create":
            sub.add_argument("key_name", nargs="?", metavar="NAME", help="who or what will use the key")
            sub.add_argument("--name", help="the same as NAME")
            sub.add_argument("--operator", action="store_true",
                             help="an operator's key: the dashboard shows it every tenant's queue and jobs")
        if name == "revoke":
            sub.add_argument("name_or_id")
    keys.set_defaults(run=_keys)

    planning = commands.add_parser(
        "plan", help="size a model catalog without loading weights",
        description="Each model's parameters, bytes at its dtype, estimated memory of a worker serving it "
                    "(loaded, and at the peak of one job) and GPUs per replica, from its config alone; "
                    "exit 0 if the catalog fits (at peak), 1 if not.")
    planning.add_argument("catalog", help="the model catalog (TOML) of `glassbox serve --models-file`")
    planning.add_argument("--gpu-memory", type=parse_size, default=0, metavar="SIZE",
                          help="memory of one GPU (e.g. 80GiB): adds GPUs needed per replica")
    planning.add_argument("--gpus", type=int, default=0, metavar="N",
                          help="GPUs in the cluster: checks every replica fits at once")
    planning.add_argument("--tokens", type=_positive, default=DEFAULT_TOKENS, metavar="N",
                          help="tokens of the job the peak is sized for (prompt + generated; "
                               f"default {DEFAULT_TOKENS})")
    planning.add_argument("--batch", type=_positive, default=DEFAULT_BATCH, metavar="N",
                          help=f"sequences in that job (default {DEFAULT_BATCH})")
    planning.set_defaults(run=_plan)

    listing = commands.add_parser("models", help="list the models a server serves")
    listing.add_argument("--host", help="server URL (default: $GLASSBOX_HOST, else http://127.0.0.1:8765)")
    listing.add_argument("--api-key", help="not needed by glassbox servers; default: $GLASSBOX_API_KEY")
    listing.set_defaults(run=_models)
    add_jobs_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
