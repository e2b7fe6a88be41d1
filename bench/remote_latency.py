"""What ``remote=True`` costs on top of a local trace: warm round trips to an embedded server.

    .venv/bin/python bench/remote_latency.py                  # 30 timed runs per model
    .venv/bin/python bench/remote_latency.py --runs 60 --json out.json
    .venv/bin/python bench/remote_latency.py --isolation process,none   # the default: both, side by side
    .venv/bin/python bench/remote_latency.py --quick          # smoke run: tiny GPT-2 only, 3 runs

Starts ``glassbox serve`` on loopback (``glassbox.cli.start_server``) holding the tiny GPT-2
and SmolLM2 under their folder names, then for each model times the same small trace (one
layer's output saved) locally and with ``remote=True``, alternating run by run after a
warm-up, so both see the same machine load. Both sides use the same number of torch threads
(``--threads``, default 1).

Printed per model: median local and remote milliseconds and their ratio, then where a
remote round trip goes:
    client      building the request (capture, encoding) and applying the reply
    submit      until the server's answer with the job's id (key check, rate limit, store writes):
                the request sent on the run websocket, kept open between jobs (or POST /v1/jobs)
    wait        from that answer until the final event arrives on the websocket; of which
      run_job     the server's own ``seconds``: time inside ``jobs.execute.run_job`` in the worker
      serving     the rest: websocket, store, feeder, pipe to and from the worker
    result      GET /v1/jobs/{id}/result (0 when the result came on the events websocket,
                with the final event: then it is part of ``wait``)
and, measured in this process on the same request (the worker's code, called directly),
where ``run_job`` goes: sandbox setup (``make_globals``), compiling, the trace itself,
and encoding the saved values (the weight check runs after the reply is sent: ``served.after_job``).

Medians of per-run values; the parts need not add up to the total exactly. Nothing here
asserts on time. Progress goes to stderr, results to stdout. On a shared machine compare
numbers within one run only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from glassbox import CONFIG, LanguageModel
from glassbox.cli import start_server
from glassbox.offline import smollm2_path, tiny_gpt2_path
from glassbox.remote import transport
from glassbox.remote.job import JobRequest, JobResult

PROMPT = "The Eiffel Tower is in the city of"


def say(text: str) -> None:
    print(f"[remote_latency] {text}", file=sys.stderr, flush=True)


# The traces timed: one layer's output saved, as small a remote job as is useful.
def trace_gpt2(model: LanguageModel, remote: bool) -> torch.Tensor:
    with model.trace(PROMPT, remote=remote):
        hidden = model.transformer.h[1].output.save()
    return hidden


def trace_smol(model: LanguageModel, remote: bool) -> torch.Tensor:
    with model.trace(PROMPT, remote=remote):
        hidden = model.model.layers[15].output.save()
    return hidden


class Probe:
    """Wraps the transport calls the client makes, recording how long each part of a round trip
    took (and the server's ``seconds``), and keeps the last request sent."""

    def __init__(self) -> None:
        self.parts: dict[str, float] = {}
        self.request: JobRequest | None = None
        self._real = (transport.submit, transport.events, transport.result, transport.run)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        submit, events, result, run = self._real

        def ended(started: float, kept: dict | None) -> None:
            """At the final event: the wait since ``started``, and the result if it came with it."""
            self.parts["wait"] = time.perf_counter() - started
            if kept is not None and "result" in kept:
                self.parts["result"] = 0.0
                self.parts["run_job"] = float(kept["result"].seconds or 0.0)

        def timed_run(host: str, api_key: str | None, request: JobRequest, **kwargs: Any) -> Iterator[dict]:
            # one websocket: "submit" until the server's answer (the job's id), "wait" until the end
            self.request = request
            started = time.perf_counter()
            kept = kwargs["keep_result"]
            for event in run(host, api_key, request, **kwargs):
                if "id" in event and "submit" not in self.parts:
                    self.parts["submit"] = time.perf_counter() - started
                    started = time.perf_counter()
                if event.get("status") in transport.FINAL:
                    ended(started, kept)
                yield event

        def timed_submit(host: str, api_key: str | None, request: JobRequest, *args: Any,
                         **kwargs: Any) -> str:
            self.request = request
            started = time.perf_counter()
            try:
                return submit(host, api_key, request, *args, **kwargs)
            finally:
                self.parts["submit"] = time.perf_counter() - started

        def timed_events(*args: Any, **kwargs: Any) -> Iterator[dict]:
            started = time.perf_counter()
            kept = kwargs.get("keep_result")
            for event in events(*args, **kwargs):
                if event.get("status") in transport.FINAL:
                    ended(started, kept)  # with keep_result the result came before the final event
                yield event

        def timed_result(*args: Any, **kwargs: Any) -> JobResult:
            started = time.perf_counter()
            reply = result(*args, **kwargs)
            self.parts["result"] = time.perf_counter() - started
            self.parts["run_job"] = float(reply.seconds or 0.0)
            return reply

        transport.submit, transport.events, transport.result, transport.run = (
            timed_submit, timed_events, timed_result, timed_run)
        try:
            yield
        finally:
            transport.submit, transport.events, transport.result, transport.run = self._real


def median_ms(values: list[float]) -> float:
    return statistics.median(values) * 1000 if values else float("nan")


def time_model(name: str, model: LanguageModel, fn: Callable[[LanguageModel, bool], Any], runs: int,
               warmup: int, servers: dict[str, tuple[str, str]]) -> dict[str, Any]:
    """Local and every server (by isolation mode) in turn, the order rotating run by run."""
    probe = Probe()
    sides = ["local", *servers]
    times: dict[str, list[float]] = {side: [] for side in sides}
    parts: dict[str, dict[str, list[float]]] = {mode: defaultdict(list) for mode in servers}

    def call(side: str) -> Any:
        if side != "local":
            CONFIG.HOST, CONFIG.API_KEY = servers[side]
        return fn(model, side != "local")

    with probe.installed():
        local = call("local")
        for mode in servers:
            if not torch.equal(local, call(mode)):
                raise SystemExit(f"{name}: the remote value ({mode}) differs from the local one; timings "
                                 "would compare different work")
        for i in range(warmup + runs):
            order = sides[i % len(sides):] + sides[:i % len(sides)]
            for side in order:
                probe.parts = {}
                started = time.perf_counter()
                call(side)
                elapsed = time.perf_counter() - started
                if i < warmup:
                    continue
                times[side].append(elapsed)
                if side == "local":
                    continue
                p, kept = probe.parts, parts[side]
                kept["total"].append(elapsed)
                for key in ("submit", "wait", "result", "run_job"):
                    kept[key].append(p.get(key, float("nan")))
                kept["serving"].append(p.get("wait", 0.0) - p.get("run_job", 0.0))
                spent = p.get("submit", 0.0) + p.get("wait", 0.0) + p.get("result", 0.0)
                kept["client"].append(elapsed - spent)
            if i + 1 == warmup or (i >= warmup and (i - warmup + 1) % 10 == 0):
                say(f"{name}: {max(0, i - warmup + 1)}/{runs} timed runs")
    assert probe.request is not None
    return {"times": times, "parts": {mode: dict(p) for mode, p in parts.items()}, "request": probe.request}


def inside_run_job(specs: dict[str, str], requests: dict[str, JobRequest], runs: int,
                   threads: int) -> dict[str, dict[str, float]]:
    """Call the worker's ``run_job`` here on the very requests the client sent, timing its parts
    by wrapping the functions it looks up at call time."""
    from glassbox.server.jobs import execute, executor

    torch.set_num_threads(threads)
    models = executor.load_models(specs)
    names = ("make_globals", "compile_restricted_source", "encode_values")
    real = {name: getattr(execute, name) for name in names}
    spent: dict[str, float] = defaultdict(float)

    def timed(name: str) -> Callable:
        fn = real[name]

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - started
        return wrapper

    out: dict[str, dict[str, float]] = {}
    for name, request in requests.items():
        rows: dict[str, list[float]] = defaultdict(list)
        for i in range(runs + 3):
            spent.clear()
            for key in names:
                setattr(execute, key, timed(key))
            try:
                torch.manual_seed(0)
                started = time.perf_counter()
                reply = execute.run_job(models, request, log=lambda text: None, limits={})
                total = time.perf_counter() - started
            finally:
                for key in names:
                    setattr(execute, key, real[key])
            if not reply.ok:
                raise SystemExit(f"{name}: run_job failed here: {reply.error}")
            if i < 3:
                continue
            rows["run_job"].append(total)
            for key in names:
                rows[key].append(spent[key])
            rows["trace and the rest"].append(total - sum(spent[key] for key in names))
        out[name] = {key: median_ms(values) for key, values in rows.items()}
        say(f"{name}: run_job in this process timed")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, help="timed runs per model and side (default 30; --quick: 3)")
    parser.add_argument("--warmup", type=int, help="untimed runs first (default 5; --quick: 1)")
    parser.add_argument("--quick", action="store_true", help=(
        "a smoke run of the whole bench in seconds: the tiny GPT-2 only (no SmolLM2), 3 timed runs "
        "after 1 warm-up, unless --runs / --warmup say otherwise"))
    parser.add_argument("--threads", type=int, default=1, help=(
        "torch threads here and in the server's worker (default 1: the two processes share this "
        "machine's cores, and on a small machine OpenMP threads spinning against each other "
        "multiply both times; measured 14 ms vs 5 ms for a tiny GPT-2 forward on 2 busy cores)"))
    parser.add_argument("--isolation", default="process,none", help=(
        "comma-separated --isolation modes, one server each, timed side by side (default process,none: "
        "a forked, confined process per job vs every job in the worker's process)"))
    parser.add_argument("--json", help="also write every number to this file")
    args = parser.parse_args(argv)
    args.runs = args.runs or (3 if args.quick else 30)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5)
    torch.set_num_threads(args.threads)

    paths = {"tiny-gpt2": tiny_gpt2_path()}
    if args.quick:
        say("quick mode: the tiny GPT-2 only (SmolLM2 left out), numbers are not meant to be read")
    else:
        paths["smollm2"] = smollm2_path()
    specs = {path.name: str(path) for path in paths.values()}
    traces = {"tiny-gpt2": trace_gpt2, "smollm2": trace_smol}
    modes = [mode.strip() for mode in args.isolation.split(",") if mode.strip()]
    results: dict[str, dict[str, Any]] = {}
    running: dict[str, Any] = {}
    logs: list[str] = []
    with tempfile.TemporaryDirectory(prefix="glassbox-bench-") as state:
        try:
            # started side by side (loading is most of a start); none is timed before all are up
            say(f"starting a server per --isolation mode ({', '.join(modes)}) with {', '.join(specs)}; "
                f"{args.threads} torch threads")
            with ThreadPoolExecutor(max_workers=len(modes) or 1) as pool:
                starting = {mode: pool.submit(start_server, specs, state_dir=os.path.join(state, mode), args=[
                    "--torch-threads", str(args.threads), "--isolation", mode]) for mode in modes}
            failed = []
            for mode, future in starting.items():
                try:
                    running[mode] = future.result()
                except Exception as err:  # the others are stopped below, then this is raised
                    failed.append(err)
            if failed:
                raise failed[0]
            servers = {mode: (server.url, server.create_key("bench")) for mode, server in running.items()}
            CONFIG.STATUS = False
            for name, path in paths.items():
                say(f"{name}: loading locally")
                model = LanguageModel(path)
                results[name] = time_model(name, model, traces[name], args.runs, args.warmup, servers)
        finally:
            for server in running.values():
                server.stop()
                logs.append(server.output())
    say("timing run_job in this process")
    inside = inside_run_job(specs, {name: r["request"] for name, r in results.items()}, args.runs,
                            args.threads)

    print(f"\nremote=True round trip vs local trace, median of {args.runs} warm runs, "
          f"{args.threads} torch threads, {os.cpu_count()} CPUs, servers called in rotating order\n")
    print("| model | isolation | local ms | remote ms | remote / local | remote - local ms |")
    print("|---|---|---:|---:|---:|---:|")
    summary: dict[str, Any] = {}
    for name, r in results.items():
        local = median_ms(r["times"]["local"])
        summary[name] = {"local_ms": local, "run_job_here_ms": inside[name], "modes": {}}
        for mode in modes:
            remote = median_ms(r["times"][mode])
            print(f"| {name} | {mode} | {local:.1f} | {remote:.1f} | {remote / local:.2f}x "
                  f"| {remote - local:.1f} |")
            parts_ms = {k: median_ms(v) for k, v in r["parts"][mode].items()}
            summary[name]["modes"][mode] = {"remote_ms": remote, "parts_ms": parts_ms}
    for name, data in summary.items():
        here = data["run_job_here_ms"]
        for mode, numbers in data["modes"].items():
            parts = numbers["parts_ms"]
            print(f"\n{name}, --isolation {mode}: where a remote round trip goes (median ms)")
            for key, label in (("client", "client: build request, apply reply"),
                               ("submit", "submit (until the id)"), ("wait", "wait for the final event"),
                               ("run_job", "  run_job in the worker"),
                               ("serving", "  serving: websocket, store, feeder, pipe, fork"),
                               ("result", "result (GET)")):
                print(f"  {label:<48} {parts.get(key, float('nan')):8.1f}")
        print(f"\n{name}: run_job called in this process:{'':10}{here['run_job']:8.1f}")
        for key, label in (("make_globals", "sandbox globals (make_globals)"),
                           ("compile_restricted_source", "compile under restriction"),
                           ("trace and the rest", "trace (exec) and the rest"),
                           ("encode_values", "encode saved values")):
            print(f"    {label:<42} {here[key]:8.1f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as file:
            json.dump({"threads": args.threads, "runs": args.runs, "models": summary,
                       "raw_seconds": {n: {"times": r["times"], "parts": r["parts"]}
                                       for n, r in results.items()}}, file, indent=1)
        say(f"wrote {args.json}")
    for log in logs:
        if "ready in" not in log:
            say("note: a server log did not show its start line:\n" + log[-2000:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
