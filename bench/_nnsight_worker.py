"""nnsight 0.8.1 side of ``bench/overhead.py``: runs in the peers virtualenv.

    .venv-peers/bin/python bench/_nnsight_worker.py [--quick] [--models mlp12,gpt2-tiny30] [--all]

Builds the same models as the main script (``_cases.py``), checks that nnsight's results
equal plain hooks', and times the raw forward and the nnsight traces in this process
(overhead is taken against this process's raw forward).

It takes turns with the main process, one timing round at a time, so that both see the
same machine load. Protocol, one JSON document per line: it prints ``{"ready": ...}``,
then reads commands on stdin: ``{"round": [model, r]}`` (answered ``{"done": r}``) and
``{"results": true}`` (answered with every number, then it exits). With ``--all`` it runs
every round on its own and prints only the results. Progress goes to stderr; stdout
carries only the protocol. The loop is ``_peer.serve_cases``, shared with
``_glassbox_worker.py``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _peer  # needs the path above


def load() -> tuple[Callable[[Any], Any], dict[str, Any]]:
    from nnsight import NNsight

    return NNsight, _peer.peer_versions()


def main() -> None:
    _peer.serve_cases(_peer.case_worker_parser(__doc__).parse_args(), "nnsight", load)


if __name__ == "__main__":
    main()
