"""The JSON-lines link between a benchmark and its worker process: nnsight or TransformerLens in
``.venv-peers`` (``PEERS_PYTHON``, the default), or an older glassbox under the main ``.venv``
(``launch(..., python=MAIN_PYTHON)``, see ``_glassbox_worker.py``).

The benchmark drives the worker one round at a time, so that the two processes take turns under
the same load: each command is one line of JSON on the worker's stdin, each answer one line on
its stdout (stray prints in the worker go to stderr).

    Benchmark side                                  Worker side
    peer = PeerProcess.launch(WORKER, [...])        send = worker_protocol()
    peer.wait_ready()                  ◄─────────   send({"ready": True, "versions": peer_versions()})
    peer.ask({"round": 0})             ─────────►   for line in sys.stdin: ... send({...})

The workers of ``overhead.py`` (``_cases.py``'s models and cases) are all one loop with a
different wrapper: ``serve_cases(case_worker_parser(__doc__).parse_args(), "nnsight", load)``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import _cases

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A git worktree of the repository has no virtualenvs of its own: PEERS_PYTHON and MAIN_PYTHON in
# the environment name the ones to use (e.g. the main checkout's), so a branch can be timed there.
PEERS_PYTHON = os.environ.get("PEERS_PYTHON") or os.path.join(ROOT, ".venv-peers", "bin", "python")
MAIN_PYTHON = os.environ.get("MAIN_PYTHON") or os.path.join(ROOT, ".venv", "bin", "python")


class PeerProcess:
    """A worker script running under ``PEERS_PYTHON`` (or another python: ``launch(python=)``)."""

    def __init__(self, process: subprocess.Popen, name: str = "nnsight") -> None:
        self.process = process
        self.name = name  # labels the log lines: one bench may run several workers side by side
        self.versions: dict[str, str] = {}

    @classmethod
    def launch(cls, worker: str, args: list[str], env: dict[str, str] | None = None,
               name: str = "nnsight", python: str = PEERS_PYTHON) -> PeerProcess | None:
        """Start ``worker`` with ``args`` under ``python``; None (and a log line saying how to fix
        it) when that python is missing."""
        if not os.path.exists(python):
            fix = "; create it with `bash bench/setup_peers.sh`" if python == PEERS_PYTHON else ""
            _cases.log(f"{name}: SKIPPED: {python} is missing{fix}")
            return None
        command = [python, worker, *args]
        _cases.log(f"{name}: starting {' '.join(command)}")
        process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                   env=env)
        return cls(process, name)

    def wait_ready(self) -> bool:
        """Wait for the worker's first line (it has loaded and warmed up); False if it stopped."""
        ready = self.ask(None)
        if ready is not None:
            self.versions = ready["versions"]
        return ready is not None

    def ask(self, command: dict | None) -> dict | None:
        """Send ``command`` (if any), return the worker's next JSON line (None: it stopped)."""
        try:
            if command is not None:
                self.process.stdin.write(json.dumps(command) + "\n")  # type: ignore[union-attr]
                self.process.stdin.flush()  # type: ignore[union-attr]
            line = self.process.stdout.readline()  # type: ignore[union-attr]
        except OSError:
            line = ""
        if not line:
            _cases.log(f"{self.name}: SKIPPED: the worker stopped (exit {self.process.wait()}); see above")
            return None
        return json.loads(line)


def worker_protocol() -> Callable[[dict], None]:
    """In a worker: keep the real stdout for answers (stray prints now go to stderr) and return
    the function that sends one answer."""
    protocol, sys.stdout = sys.stdout, sys.stderr

    def send(document: dict) -> None:
        protocol.write(json.dumps(document) + "\n")
        protocol.flush()

    return send


def peer_versions() -> dict[str, Any]:
    """What the worker runs: nnsight, torch, transformers and Python versions."""
    import nnsight
    import torch
    import transformers

    return {"nnsight": nnsight.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": sys.version.split()[0]}


def case_worker_parser(doc: str) -> argparse.ArgumentParser:
    """The options of every ``_cases.py`` worker (``overhead.py`` passes its own on)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--models", default=",".join(_cases.MODELS))
    parser.add_argument("--all", action="store_true", help="run every round alone, print the results")
    return parser


def serve_cases(args: argparse.Namespace, variant: str,
                load: Callable[[], tuple[Callable[[Any], Any], dict[str, Any]]]) -> None:
    """The whole life of a ``_cases.py`` worker timing ``variant`` against the raw forward.

    ``load()`` (called once stdout is kept for the protocol, so imports may print) returns the
    wrapper (bare module -> traced net, e.g. ``NNsight``) and the versions to report. Every case
    is checked equal to plain hooks' before timing (``_cases.prepare_rounds``). Then either
    ``--all`` (every round alone, only the results printed) or the protocol: ``{"ready": ...}``,
    then ``{"round": [model, r]}`` answered ``{"done": r}``, until ``{"results": true}``,
    answered with every number."""
    send = worker_protocol()
    _cases.configure_torch()
    wrap, versions = load()
    settings = _cases.QUICK if args.quick else _cases.FULL
    prepared, _ = _cases.prepare_rounds(args.models.split(","), settings, wrap, variant)
    if args.all:
        for rounds in prepared.values():
            for r in range(settings.rounds):
                rounds.run(r)
    else:
        def run_round(command: list) -> dict:
            name, r = command
            prepared[name].run(r)
            return {"done": r}

        answer_commands(send, versions, "round", run_round)
    send({"versions": versions, "results": {name: rounds.results() for name, rounds in prepared.items()}})


def answer_commands(send: Callable[[dict], None], versions: dict[str, str], key: str,
                    handle: Callable[[Any], dict]) -> None:
    """A prepared worker's side of the protocol: ``{"ready": ...}``, then each ``{key: argument}``
    on stdin answered with ``handle(argument)``, until ``{"results": true}`` (the caller then sends
    its results)."""
    send({"ready": True, "versions": versions})
    for line in sys.stdin:
        command = json.loads(line)
        if key in command:
            send(handle(command[key]))
        elif command.get("results"):
            break
