"""Where a glassbox trace spends its time: cProfile over many traces of one case.

    .venv/bin/python bench/profile_trace.py                       # mlp12 save_12
    .venv/bin/python bench/profile_trace.py --model mlp12 --case empty --top 25
    .venv/bin/python bench/profile_trace.py --quick                # 100 calls, top 10: a smoke run

Runs the case from ``_cases.py`` (the same trace body ``overhead.py`` times) ``--n`` times
under cProfile and prints the functions with the most own time, then the same for plain
hooks as a reference. Read the call counts and the ranking, not the absolute times:
cProfile inflates small Python functions, and greenlet switches confuse its bookkeeping
(time spent in the model's greenlet can land on the trace body's frames). ``overhead.py``
gives the real costs.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _cases  # needs the path above


def profile(fn: object, n: int, top: int, title: str) -> None:
    for _ in range(20):
        fn()  # type: ignore[operator]
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(n):
        fn()  # type: ignore[operator]
    profiler.disable()
    print(f"\n### {title}: {n} calls, sorted by own time\n")
    stats = pstats.Stats(profiler, stream=sys.stdout)
    stats.sort_stats("tottime").print_stats(top)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="mlp12", choices=list(_cases.MODELS))
    parser.add_argument("--case", default="save_12")
    parser.add_argument("--n", type=int, help="calls profiled (default 2000; --quick: 100)")
    parser.add_argument("--top", type=int, help="functions printed (default 30; --quick: 10)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 100 calls, top 10")
    args = parser.parse_args()
    args.n = args.n or (100 if args.quick else 2000)
    args.top = args.top or (10 if args.quick else 30)

    from glassbox import NNsight

    _cases.configure_torch()
    bench = _cases.MODELS[args.model]()
    traced = _cases.traced_cases(bench, NNsight(bench.module))
    if args.case not in traced:
        parser.error(f"unknown case {args.case!r} for {args.model}; choose from {', '.join(traced)}")
    profile(traced[args.case], args.n, args.top, f"glassbox {args.model} {args.case}")
    profile(_cases.hook_cases(bench)[args.case], args.n, args.top, f"hooks {args.model} {args.case}")


if __name__ == "__main__":
    main()
