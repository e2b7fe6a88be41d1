"""The JSON-lines link between a benchmark and its worker (nnsight, TransformerLens) in ``.venv-peers``.

The benchmark drives the worker one round at a time, so that the two processes take turns under
the same load: each command is one line of JSON on the worker's stdin, each answer one line on
its stdout (stray prints in the worker go to stderr).

    Benchmark side                                  Worker side
    peer = PeerProcess.launch(WORKER, [...])        send = worker_protocol()
    peer.wait_ready()                  ◄─────────   send({"ready": True, "versions": peer_versions()})
    peer.ask({"round": 0})             ─────────►   for line in sys.stdin: ... send({...})
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import _cases

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS_PYTHON = os.path.join(ROOT, ".venv-peers", "bin", "python")


class PeerProcess:
    """A worker script running under ``PEERS_PYTHON``."""

    def __init__(self, process: subprocess.Popen, name: str = "nnsight") -> None:
        self.process = process
        self.name = name  # labels the log lines: one bench may run several workers side by side
        self.versions: dict[str, str] = {}

    @classmethod
    def launch(cls, worker: str, args: list[str], env: dict[str, str] | None = None,
               name: str = "nnsight") -> PeerProcess | None:
        """Start ``worker`` with ``args``; None (and a log line saying how to fix it) without the
        peers virtualenv."""
        if not os.path.exists(PEERS_PYTHON):
            _cases.log(f"{name}: SKIPPED: {PEERS_PYTHON} is missing; create it with "
                       "`bash bench/setup_peers.sh`")
            return None
        command = [PEERS_PYTHON, worker, *args]
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
