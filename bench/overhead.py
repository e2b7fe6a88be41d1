"""What a trace costs: glassbox side by side with plain torch hooks and nnsight 0.8.1.

    .venv/bin/python bench/overhead.py                 # full run, about 10 minutes
    .venv/bin/python bench/overhead.py --quick         # smoke run, under a minute
    .venv/bin/python bench/overhead.py --json out.json # also write every number
    .venv/bin/python bench/overhead.py --baseline 0f59878  # also glassbox as of that commit
    bash bench/setup_peers.sh                          # once: the nnsight virtualenv

Models and cases are defined in ``_cases.py`` (a 12-layer Linear MLP and a 30-layer tiny
GPT-2; empty trace, save 1 / 12 / all layers, zero one layer, a 31-trace patching sweep).
Variants, all in ONE process except nnsight and glassbox@REV:
    raw       the bare module's forward, nothing installed
    hooks     plain ``register_forward_hook`` saving / patching the same values; hooks are
              registered and removed per trace, since that is what a user pays
    glassbox  ``with NNsight(module).trace(x): ...``
    nnsight   the same trace bodies under nnsight 0.8.1, in a subprocess of the peers
              virtualenv (``_nnsight_worker.py``), which re-times the raw forward in its own
              process; its overhead is taken against that raw time. The two processes take
              turns round by round, so both see the same machine load
    glassbox@REV  only with ``--baseline REV``: glassbox as of git revision REV, timed like
              nnsight, in a worker (``_glassbox_worker.py``) under the main ``.venv`` python
              importing glassbox from a detached worktree ``/tmp/glassbox-bench-REV`` (made
              once, reused), against its own raw forward. Reported beside glassbox (µs,
              overhead, per access, targets) with "before/after overhead": REV's overhead
              over today's (2x: today's trace costs half). Targets judge today's glassbox only
    glassbox-worker  only with ``--baseline``: today's checkout in the same kind of worker, so
              that "before/after" compares two workers timed alike. The same code timed in
              this process and in a worker can differ by several µs per trace (this process
              also holds the hooks variant and every case's state), so comparing the in-process
              glassbox with glassbox@REV would credit or blame the change with that difference
Every call is timed alone with ``time.perf_counter`` after a warm-up; the variants of a case
alternate call by call in rotated order, round after round, so drift in machine load hits
all of them alike. Reported per variant: the median µs per trace (per sweep for
``sweep_31``) and the overhead: the median of paired differences (each call minus the raw
call next to it) with a distribution-free 95% interval. All variants run in torch's default
grad mode, eval mode, one intra-op thread; before timing, every variant's results are
checked equal to the hooks' (the same work is timed).

Printed (``_overhead_report.py``): per-variant detail, per-access cost, one markdown table,
and PASS/MISS against the targets of DESIGN.md §4, marked "within noise" where the 95%
interval straddles the target. On a shared machine compare numbers within one run only.
Nothing here asserts on time. Progress goes to stderr, results to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _cases  # needs the path above
import _glassbox_worker
import _overhead_report as report
import _peer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "bench", "_nnsight_worker.py")

Results = dict[str, Any]


def run_all(
    models: list[str], settings: _cases.Settings, with_nnsight: bool, quick: bool,
    baseline: tuple[str, str] | None,
) -> tuple[Results, Results | None, Results | None, Results | None, dict[str, int]]:
    """Alternate rounds: glassbox process, then the nnsight worker, then the glassbox@REV one
    (``baseline``: REV and its worktree) and today's checkout in a worker like it, round after
    round. Returns each side's results (None: not measured) and the layer counts."""
    args = ["--models", ",".join(models)] + (["--quick"] if quick else [])
    peers: dict[str, _peer.PeerProcess] = {}
    if with_nnsight:
        peer = _peer.PeerProcess.launch(WORKER, args)
        if peer is not None and peer.wait_ready():
            peers["nnsight"] = peer
    if baseline is not None:
        peers["baseline"] = _glassbox_worker.start(*baseline, args)
        peers["twin"] = _glassbox_worker.start("checkout", ROOT, args, label=report.TWIN)
    from glassbox import NNsight

    prepared, layer_counts = _cases.prepare_rounds(models, settings, NNsight, "glassbox", with_hooks=True)
    for name, rounds in prepared.items():
        for r in range(settings.rounds):
            rounds.run(r)
            for key, peer in list(peers.items()):
                if peer.ask({"round": [name, r]}) is None:
                    del peers[key]
    answers = {key: peer.ask({"results": True}) for key, peer in peers.items()}
    for peer in peers.values():
        peer.process.wait()
    gb = {name: rounds.results() for name, rounds in prepared.items()}
    return gb, answers.get("nnsight"), answers.get("baseline"), answers.get("twin"), layer_counts


def glassbox_source() -> str:
    """Which glassbox was timed: the commit, and the files under src/ that differ from it."""
    def git(*argv: str) -> str:
        done = subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True, check=False)
        return done.stdout if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD").strip() or "unknown commit"
    changed = [line[3:] for line in git("status", "--porcelain", "--", "src").splitlines()]
    return f"{commit} + uncommitted {', '.join(changed)}" if changed else f"{commit} (clean)"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="few repetitions: a smoke run")
    parser.add_argument("--json", metavar="PATH", help="write every number to PATH")
    parser.add_argument("--models", default=",".join(_cases.MODELS), help="comma-separated subset")
    parser.add_argument("--no-nnsight", action="store_true", help="skip the nnsight subprocess")
    parser.add_argument("--baseline", metavar="REV",
                        help="also time glassbox as of git revision REV (a worker on a /tmp worktree)")
    args = parser.parse_args()
    models = args.models.split(",")
    for name in models:
        if name not in _cases.MODELS:
            parser.error(f"unknown model {name!r}; choose from {', '.join(_cases.MODELS)}")

    _cases.configure_torch()
    settings = _cases.QUICK if args.quick else _cases.FULL
    source = glassbox_source()
    _cases.log(f"glassbox source: {source}")
    label = worktree = commit = None
    if args.baseline:
        label = f"glassbox@{args.baseline}"
        worktree, commit = _glassbox_worker.worktree(args.baseline)
    load_before = os.getloadavg()
    baseline = (args.baseline, worktree) if worktree is not None else None
    gb, nn, base, twin, layer_counts = run_all(models, settings, not args.no_nnsight, args.quick, baseline)
    load_after = os.getloadavg()
    rows = report.build_rows(gb, nn, base, label, twin)
    access = report.per_access(rows, layer_counts, label)
    checks = report.targets(rows, access, label)
    print(f"glassbox source: {source}")
    print(f"machine: {os.cpu_count()} CPUs, 1-min load average {load_before[0]:.2f} before, "
          f"{load_after[0]:.2f} after (other processes add noise; compare within one run)")
    if nn is not None:
        print(f"nnsight process: {nn['versions']}")
    if label is not None:
        print(f"{label} process: commit {commit}, worktree {worktree}, {base and base['versions']}")
    report.print_report(rows, access, checks, nn, base, label, twin)
    if args.json:
        import torch
        import transformers

        document = {
            "settings": {"quick": args.quick, **vars(settings), "grad_mode": "default (enabled)",
                         "torch_threads": torch.get_num_threads()},
            "glassbox_source": source,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "python": sys.version.split()[0], "nnsight_process": nn and nn["versions"]},
            "glassbox": gb, "nnsight": nn and nn["results"], "rows": rows, "per_access": access,
            "targets": [{"target": n, "pass": ok, "value": d} for n, ok, d in checks],
            "load_average": {"before": load_before, "after": load_after},
        }
        if label is not None:
            document["baseline"] = {"variant": label, "rev": args.baseline, "commit": commit,
                                    "worktree": worktree, "versions": base and base["versions"],
                                    "results": base and base["results"]}
            document["twin"] = {"variant": report.TWIN, "results": twin and twin["results"]}
        with open(args.json, "w") as handle:
            json.dump(report.finite(document), handle, indent=2)
        _cases.log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
