"""What split execution costs: a co-tenant batch run split (a host process and a process per request)
against the same batch in one process, per batch and per module boundary, side by side.

    .venv/bin/python bench/split_cost.py                       # tiny GPT-2 and SmolLM2, batches of 1 and 4
    .venv/bin/python bench/split_cost.py --models gpt2 --runs 20 --batch 1,4,8
    .venv/bin/python bench/split_cost.py --quick                # smoke run: tiny GPT-2, batches of 2, 1 run

For each model and batch size n, the same n requests (different prompts) run, alternating run by
run so both see the same machine load:
    one process   ``cotenant.run_batch`` in a process forked for the batch (what ``--isolation none``
                  runs, and what the default isolation ran before split execution)
    split         ``split_host.run_host`` in one forked process and ``split_body.run_body`` in one
                  forked process per request, linked by socket pairs (what ``workers/split.py``
                  sets up, but with a host forked per batch: the server keeps one long-lived,
                  warm host, so this column also pays a cold forward, and is an upper bound)
each with a block that reads 1 layer's output, then one that reads every layer's. This process
warms up first, as a worker does (``execute.warm_up``). Printed: the
median milliseconds of each, the ratio split / one process, and the cost of one module boundary
in a split batch: (every layer - 1 layer) / (layers - 1), per request, against the same in one
process. Nothing here asserts on time; compare numbers within one run only.
"""

from __future__ import annotations

import argparse
import os
import pickle
import socket
import statistics
import sys
import time
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))  # job_requests: requests as a client frames them

from glassbox import LanguageModel  # noqa: E402
from glassbox.offline import smollm2_path, tiny_gpt2_path  # noqa: E402
from glassbox.remote.job import JobResult  # noqa: E402
from glassbox.server.jobs.cotenant import run_batch  # noqa: E402
from glassbox.server.jobs.execute import warm_up  # noqa: E402
from glassbox.server.jobs.split_body import run_body  # noqa: E402
from glassbox.server.jobs.split_host import run_host  # noqa: E402
from job_requests import job_request  # noqa: E402

PROMPTS = ["The Eiffel Tower is in the city of", "Hello there", "A longer prompt with more tokens in it",
           "The capital of France is", "One", "Two words", "Three little words", "Four words in a row"]


def _layers(model: Any) -> tuple[str, int]:
    if hasattr(model, "transformer"):
        return "model.transformer.h", len(model.transformer.h)
    return "model.model.layers", len(model.model.layers)


def _source(model: Any, every: bool) -> str:
    prefix, count = _layers(model)
    reads = range(count) if every else [count - 1]
    lines = [f"h{i} = {prefix}[{i}].output" for i in reads]
    return "\n".join(lines) + f"\nh = h{reads[-1]}.save()\n"


def _requests(source: str, n: int) -> list[Any]:
    return [job_request(source, model="m", inputs=[PROMPTS[i % len(PROMPTS)]], first_line=10,
                        returns=("h",), filename="<bench>") for i in range(n)]


def _in_child(fn: Any) -> int:
    """Fork a process that runs ``fn()`` and writes its pickled result to a pipe; return the pipe."""
    read, write = os.pipe()
    if os.fork() == 0:
        try:
            os.close(read)
            data = pickle.dumps(fn())
            with os.fdopen(write, "wb") as out:
                out.write(data)
        finally:
            os._exit(0)
    os.close(write)
    return read


def _collect(pipes: list[int]) -> list[Any]:
    results = []
    for pipe in pipes:
        with os.fdopen(pipe, "rb") as source:
            results.append(pickle.loads(source.read()))
    while True:
        try:
            os.wait()
        except ChildProcessError:
            return results


def one_process(models: dict, requests: list[Any]) -> float:
    started = time.perf_counter()
    pipe = _in_child(lambda: [r.frame() for r in run_batch(models, requests, logs=[print] * len(requests))])
    results = _collect([pipe])[0]
    assert all(JobResult.read(r).ok for r in results)
    return time.perf_counter() - started


def split(models: dict, requests: list[Any]) -> float:
    started = time.perf_counter()
    pairs = [socket.socketpair() for _ in requests]
    host = _in_child(lambda: run_host(models, requests, [a.fileno() for a, _ in pairs]))
    bodies = [_in_child(lambda r=r, b=b: run_body(models, r, b.fileno(), log=print).frame())
              for r, (_, b) in zip(requests, pairs)]
    for a, b in pairs:
        a.close()
        b.close()
    results = _collect([host, *bodies])
    assert results[0] is True and all(JobResult.read(r).ok for r in results[1:])
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="default gpt2,smollm2 (--quick: gpt2)")
    parser.add_argument("--batch", help="batch sizes (default 1,4; --quick: 2)")
    parser.add_argument("--runs", type=int, help="timed runs per case (default 10; --quick: 1)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: checks the bench runs, not its numbers")
    args = parser.parse_args()
    quick = {"models": "gpt2", "batch": "2", "runs": 1} if args.quick else {}
    for name, default in (("models", "gpt2,smollm2"), ("batch", "1,4"), ("runs", 10)):
        if getattr(args, name) is None:
            setattr(args, name, quick.get(name, default))
    torch.set_num_threads(1)  # forked children: no OpenMP region may have run in this process
    paths = {"gpt2": tiny_gpt2_path, "smollm2": smollm2_path}
    print(f"split execution against one process{' (--quick)' if args.quick else ''}, medians of {args.runs}")
    print(f"{'model':8} {'n':>2} {'block':>7} {'one process ms':>15} {'split ms':>9} {'ratio':>6}")
    for name in args.models.split(","):
        models = {"m": LanguageModel(paths[name](), dispatch=True)}
        warm_up(models)  # as a worker does before it forks job processes
        _, layers = _layers(models["m"])
        for n in [int(b) for b in args.batch.split(",")]:
            medians = {}
            for every in (False, True):
                requests = _requests(_source(models["m"], every), n)
                one_process(models, requests), split(models, requests)  # warm
                times: dict[str, list[float]] = {"one": [], "split": []}
                for _ in range(args.runs):
                    times["one"].append(one_process(models, requests))
                    times["split"].append(split(models, requests))
                one, cut = (statistics.median(times[k]) * 1e3 for k in ("one", "split"))
                medians[every] = (one, cut)
                label = f"{layers} reads" if every else "1 read"
                print(f"{name:8} {n:>2} {label:>7} {one:>15.1f} {cut:>9.1f} {cut / one:>6.2f}", flush=True)
            per_one = (medians[True][0] - medians[False][0]) / (layers - 1) / n * 1e3
            per_split = (medians[True][1] - medians[False][1]) / (layers - 1) / n * 1e3
            print(f"{name:8} {n:>2} per boundary and request: one process {per_one:.0f} µs, "
                  f"split {per_split:.0f} µs", flush=True)


if __name__ == "__main__":
    main()
