"""glassbox as of an older git revision, timed beside today's by ``bench/overhead.py --baseline REV``.

    .venv/bin/python bench/overhead.py --baseline 0f59878            # how it is meant to run
    PYTHONPATH=/tmp/glassbox-bench-0f59878/src .venv/bin/python bench/_glassbox_worker.py \\
        --expect-root /tmp/glassbox-bench-0f59878 [--label glassbox@0f59878] [--quick] [--all]

Bench side (``worktree`` and ``start`` below): REV is checked out once into a detached git
worktree, ``/tmp/glassbox-bench-REV`` (``git worktree add --detach``; reused when it is
already there, at that commit and clean; refused otherwise), and this script runs under the
main ``.venv`` python with ``PYTHONPATH=<worktree>/src``, so it imports the old glassbox while
the models, cases, checks and timing loop are today's ``_cases.py``.

Worker side: it prints ``glassbox.__file__`` to stderr and refuses to run unless that file
lies under ``--expect-root`` (the bench checks the reported path again). Otherwise it is
``_nnsight_worker.py`` with glassbox's ``NNsight``: same check against plain hooks, same
round-by-round protocol (``_peer.serve_cases``), same results, under the variant name
``--label`` (``overhead.py`` passes ``glassbox@REV``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _cases  # needs the path above
import _peer

WORKER = os.path.abspath(__file__)
WORKTREE = "/tmp/glassbox-bench-{}"


def under(path: str, root: str) -> bool:
    path, root = os.path.realpath(path), os.path.realpath(root)
    return os.path.commonpath([path, root]) == root


def _git(*argv: str, cwd: str = _peer.ROOT) -> str:
    done = subprocess.run(["git", *argv], cwd=cwd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"glassbox baseline: `git {' '.join(argv)}` in {cwd} failed: {done.stderr.strip()}")
    return done.stdout.strip()


def worktree(rev: str) -> tuple[str, str]:
    """The detached worktree of ``rev`` (made now, or reused if already there) and its short commit."""
    commit = _git("rev-parse", "--verify", f"{rev}^{{commit}}")
    path = WORKTREE.format(rev.replace("/", "_"))
    if not os.path.exists(path):
        _cases.log(f"glassbox@{rev}: git worktree add --detach {path} {commit[:12]}")
        _git("worktree", "add", "--detach", path, commit)
    elif not os.path.exists(os.path.join(path, ".git")):
        raise SystemExit(f"glassbox baseline: {path} exists but is no git worktree; remove it")
    else:
        there = _git("rev-parse", "HEAD", cwd=path)
        if there != commit:
            raise SystemExit(f"glassbox baseline: {path} is at {there[:12]}, not {rev} ({commit[:12]}); "
                             f"remove it (`git worktree remove {path}`) and run again")
        if _git("status", "--porcelain", "--untracked-files=no", cwd=path):
            raise SystemExit(f"glassbox baseline: {path} has local changes; it would not time {rev}")
        _cases.log(f"glassbox@{rev}: reusing {path} ({commit[:12]})")
    return path, _git("rev-parse", "--short", commit)


def start(rev: str, path: str, args: list[str], label: str | None = None) -> _peer.PeerProcess:
    """Launch the worker on the worktree at ``path`` and wait until it is ready; it must have
    imported glassbox from there (else SystemExit: a baseline that is not REV is worse than none).
    ``label``: its variant's name (default ``glassbox@REV``; ``overhead.py`` also runs today's
    checkout this way, as ``glassbox-worker``, so that before and after are timed alike)."""
    env = {**os.environ, "PYTHONPATH": os.path.join(path, "src")}
    label = label or f"glassbox@{rev}"
    peer = _peer.PeerProcess.launch(WORKER, [*args, "--expect-root", path, "--label", label], env=env,
                                    name=label, python=_peer.MAIN_PYTHON)
    if peer is None or not peer.wait_ready():
        raise SystemExit(f"{label}: the worker did not start; its error is above")
    imported = peer.versions.get("glassbox_file", "")
    if not under(imported, path):
        peer.process.kill()
        raise SystemExit(f"{label}: the worker imported glassbox from {imported}, not from {path}")
    return peer


def main() -> None:
    parser = _peer.case_worker_parser(__doc__)
    parser.add_argument("--expect-root", required=True, help="glassbox must be imported from under here")
    parser.add_argument("--label", default="glassbox@baseline", help="the variant's name in the results")
    args = parser.parse_args()

    def load() -> tuple[Callable[[Any], Any], dict[str, Any]]:
        import torch
        import transformers

        import glassbox
        from glassbox import NNsight

        _cases.log(f"glassbox worker: glassbox.__file__ = {glassbox.__file__}")
        if not under(glassbox.__file__, args.expect_root):
            raise SystemExit(f"glassbox worker: refusing to run: glassbox was imported from "
                             f"{glassbox.__file__}, not from under {args.expect_root} (check PYTHONPATH)")
        return NNsight, {"glassbox_file": glassbox.__file__, "torch": torch.__version__,
                         "transformers": transformers.__version__, "python": sys.version.split()[0]}

    _peer.serve_cases(args, args.label, load)


if __name__ == "__main__":
    main()
