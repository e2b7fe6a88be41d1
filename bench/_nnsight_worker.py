"""nnsight 0.8.1 side of ``bench/overhead.py``: runs in the peers virtualenv.

    .venv-peers/bin/python bench/_nnsight_worker.py [--quick] [--models mlp12,gpt2-tiny30]

Builds the same models as the main script (``_cases.py``), checks that nnsight's results
equal plain hooks', and times the raw forward and the nnsight traces in this process
(overhead is taken against this process's raw forward).

It takes turns with the main process, one timing round at a time, so that both see the
same machine load. Protocol, one JSON document per line: it prints ``{"ready": ...}``,
then reads commands on stdin: ``{"round": [model, r]}`` (answered ``{"done": r}``) and
``{"results": true}`` (answered with every number, then it exits). With ``--all`` it runs
every round on its own and prints only the results. Progress goes to stderr; stdout
carries only the protocol.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _cases  # needs the path above
import _peer


def prepare(models: list[str], settings: _cases.Settings) -> dict[str, _cases.Rounds]:
    from nnsight import NNsight

    prepared = {}
    for name in models:
        bench = _cases.MODELS[name]()
        net = NNsight(bench.module)
        traced = _cases.traced_cases(bench, net)
        hooks = _cases.hook_cases(bench)
        for case, fn in traced.items():
            problem = _cases.check_same(case, hooks[case](), fn())
            if problem:
                raise SystemExit(f"nnsight worker: nnsight result differs from hooks: {name} {problem}")
        raw = _cases.raw_cases(bench)
        jobs = {case: {"raw": raw[case], "nnsight": traced[case]} for case in traced}
        prepared[name] = _cases.Rounds(jobs, settings, f"nnsight {name}")
    return prepared


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--models", default=",".join(_cases.MODELS))
    parser.add_argument("--all", action="store_true", help="run every round alone, print the results")
    args = parser.parse_args()

    send = _peer.worker_protocol()
    _cases.configure_torch()
    versions = _peer.peer_versions()
    settings = _cases.QUICK if args.quick else _cases.FULL
    prepared = prepare(args.models.split(","), settings)
    if args.all:
        for rounds in prepared.values():
            for r in range(settings.rounds):
                rounds.run(r)
    else:
        send({"ready": True, "versions": versions})
        for line in sys.stdin:
            command = json.loads(line)
            if "round" in command:
                name, r = command["round"]
                prepared[name].run(r)
                send({"done": r})
            elif command.get("results"):
                break
    send({"versions": versions, "results": {name: rounds.results() for name, rounds in prepared.items()}})


if __name__ == "__main__":
    main()
