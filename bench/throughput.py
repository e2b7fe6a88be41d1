"""Co-tenant batching throughput: many clients, one model, batching off and on, side by side.

    .venv/bin/python bench/throughput.py                        # local backend, then ray if it starts
    .venv/bin/python bench/throughput.py --clients 16 --requests-per-client 24 --backends local
    .venv/bin/python bench/throughput.py --backends ray --ray-replicas 1,2 --json out.json
    .venv/bin/python bench/throughput.py --quick                # smoke run: tiny GPT-2, local, ~1 minute

Per backend (local; ray with R replicas) two ``glassbox serve`` (``glassbox.cli.start_server``)
holding SmolLM2-135M run on loopback at the same time, identical but for ``--max-batch`` (1:
batching off; the server's default, 16: on), both with ``--rate-limit-per-minute 0
--max-jobs-per-key 0`` and the same ``--torch-threads``. Each is warmed up; then ``--rounds``
rounds alternate between them (off, on, on, off, ...), so that both see the same background
load on a shared machine. In a round ``--clients`` threads each run their share of
``--requests-per-client`` small traces in a closed loop (send, wait for the result, send the
next) through the real client, ``model.trace(prompt, remote=True)``, reading the last
position's logits. Prompts have several lengths (2 to 8 tokens), so batches are padded.

Client: ``remote=True`` traces from several threads are safe. The remote path keeps no
per-model trace state (``model._active`` belongs to local traces only), skipping the block uses
``sys.settrace`` and the frame's own tracer (both per thread), the captured-body cache is locked,
the HTTP pool (one httpx.Client) is shared and thread-safe, and saved values are written back
into each thread's own frame. ``CONFIG.HOST`` / ``API_KEY`` are process-wide: all clients share
one key per server. ``glassbox.remote.transport`` is wrapped to keep each thread's last
result.

Printed per configuration: requests/s, p50 and p95 latency (ms), the mean batch size (requests
per forward pass) and the share of requests that ran batched (from the counts ``/v1/health``
shows a key holder: batches of more than one job and the jobs they held; a result does not say
whether it shared a pass), the batches of more than one job, and
where the CPU went, in CPU-milliseconds per request: this client process, the server's API
process, its worker process(es) (every descendant: the local worker, or Ray's processes and
replicas), and everything else on the machine (other users). Then per backend the throughput
ratio on/off against issue 21's target (>= 3x), PASS or MISS.

Correctness: every measured result (the last position's logits, batched or not) is compared with
the same request run alone on the same server during its warm-up: max abs difference per
prompt, with the size of the batch it came from, and how many results were over 1e-4. A result
handed to the wrong client thread would show here too.

``--omp-wait-policy PASSIVE`` runs the servers with OpenMP threads that sleep rather than spin
while waiting; ``--profile-worker`` afterwards times ``child.handle_message`` in this process
for batches of 1, 4, 16 requests, with ``after_job`` (the weight check) apart.

``--quick`` runs the whole bench in about a minute to check that it still works, not to measure:
the tiny GPT-2 instead of SmolLM2, the local backend only (unless ``--backends`` says otherwise),
4 clients x 2 requests in 1 round, and ``--profile-worker 1,2``; any option given explicitly wins.

Nothing asserts on time. Progress goes to stderr, the table to stdout. On a shared machine
compare numbers within one run only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import httpx
import torch

from glassbox import CONFIG, LanguageModel
from glassbox.cli import RunningServer, start_server
from glassbox.offline import smollm2_path, tiny_gpt2_path
from glassbox.remote import transport
from glassbox.remote.job import JobRequest, JobResult

try:
    import psutil
except ImportError:  # CPU accounting is then left out
    psutil = None

# Short prompts of 2, 4, 5, 7, 8 and 4 tokens: a batch of them is left-padded. Lengths equal to a
# dimension of SmolLM2 (3 and 9: its key/value and attention head counts; 32, 64...) are avoided
# on purpose: a batch padded to such a length is split by exact length (cotenant._groups).
PROMPTS = [
    "Paris is",
    "The cat sat on",
    "The capital of France is",
    "The Eiffel Tower is in the",
    "The Eiffel Tower is in the city",
    "Once upon a time",
]
TARGET = 3.0  # issue 21: batching on, every body in its own process, at least 3x batching off
TOLERANCE = 1e-4
_started = time.monotonic()


def say(text: str) -> None:
    print(f"[throughput {time.monotonic() - _started:6.1f}s] {text}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the request


def last_logits(model: LanguageModel, prompt: str) -> torch.Tensor:
    with model.trace(prompt, remote=True):
        logits = model.output.logits[:, -1].save()
    return logits


class Exchanges:
    """Wraps ``transport.run``, ``transport.submit`` and ``transport.result`` (which the client looks
    up at call time) to keep, per thread, the last JobRequest sent and the last JobResult received."""

    def __init__(self) -> None:
        self.local = threading.local()
        self.real = (transport.submit, transport.result, transport.run)

    def install(self) -> None:
        submit, result, run = self.real

        def running(host: str, api_key: str | None, request: JobRequest, **kwargs: Any) -> Any:
            self.local.request = request
            kept = kwargs["keep_result"]
            for event in run(host, api_key, request, **kwargs):
                if event.get("status") in transport.FINAL and "result" in kept:
                    self.local.last = kept["result"]  # it came with the final event
                yield event

        def submitting(host: str, api_key: str | None, request: JobRequest, *args: Any,
                       **kwargs: Any) -> str:
            self.local.request = request
            return submit(host, api_key, request, *args, **kwargs)

        def receiving(*args: Any, **kwargs: Any) -> JobResult:
            reply = result(*args, **kwargs)
            self.local.last = reply
            return reply

        transport.submit, transport.result, transport.run = submitting, receiving, running

    def uninstall(self) -> None:
        transport.submit, transport.result, transport.run = self.real

    def last(self) -> JobResult | None:
        return getattr(self.local, "last", None)


EXCHANGES = Exchanges()
REQUESTS: dict[str, JobRequest] = {}  # prompt -> the job request the client sent for it


def traced(model: LanguageModel, prompt: str) -> tuple[torch.Tensor, float, JobResult | None]:
    EXCHANGES.local.last = None
    started = time.perf_counter()
    logits = last_logits(model, prompt)
    return logits, time.perf_counter() - started, EXCHANGES.last()


# ---------------------------------------------------------------- configurations and results


@dataclass
class Config:
    label: str
    backend: str
    max_batch: int  # 1: batching off; 0: the server's default
    replicas: int = 1

    @property
    def group(self) -> str:
        return "local backend" if self.backend == "local" else f"ray backend, {self.replicas} replica(s)"

    def args(self, name: str, threads: int) -> list[str]:
        args = ["--torch-threads", str(threads), "--rate-limit-per-minute", "0", "--max-jobs-per-key", "0"]
        if self.max_batch:
            args += ["--max-batch", str(self.max_batch)]
        if self.backend == "ray":
            args += ["--backend", "ray", "--isolation", "none", "--replicas", f"{name}={self.replicas}"]
        return args


@dataclass
class Outcome:
    config: Config
    error: str = ""
    requests: int = 0
    failures: int = 0
    first_failure: str = ""
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    health_batches: int | None = 0  # batches of more than one job, from /v1/health
    batched_jobs: int = 0  # the jobs those batches held
    capped: bool = False  # a round stopped at --seconds-per-config before all its requests
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds: client, api, worker, others
    reference: dict[str, torch.Tensor] = field(default_factory=dict)  # prompt -> its result run alone
    worst: dict[str, tuple[float, int]] = field(default_factory=dict)  # prompt -> (max abs diff, batch)
    over: int = 0  # results further than TOLERANCE from the reference
    server: RunningServer | None = None
    key: str = ""

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds if self.seconds else float("nan")

    def latency_ms(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return 1000 * ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]

    @property
    def mean_batch(self) -> float:
        if self.health_batches is None or not self.requests:
            return float("nan")
        passes = self.requests - self.batched_jobs + self.health_batches
        return self.requests / passes if passes else float("nan")

    @property
    def batched_share(self) -> float:
        return self.batched_jobs / self.requests if self.requests else 0.0

    def cpu_ms(self, part: str) -> float:
        return 1000 * self.cpu[part] / self.requests if part in self.cpu and self.requests else float("nan")


def health_counts(url: str, key: str) -> tuple[int, int] | None:
    """(batches of more than one job, the jobs they held) so far, summed over the replicas."""
    try:
        health = httpx.get(url + "/v1/health", headers={"Authorization": f"Bearer {key}"}, timeout=10).json()
        replicas = health.get("replicas") or []
        return (sum(int(r.get("batches") or 0) for r in replicas),
                sum(int(r.get("batched_jobs") or 0) for r in replicas))
    except Exception:
        return None


class CpuMeter:
    """CPU seconds spent, between ``start()`` and ``stop()``, by this process, the server's API
    process, its descendants, and the rest of the machine."""

    def __init__(self, server: RunningServer) -> None:
        self.server = server
        self.before: dict[str, float] = {}

    def _read(self) -> dict[str, float]:
        if psutil is None:
            return {}
        api = psutil.Process(self.server.process.pid)
        worker = 0.0
        for child in api.children(recursive=True):
            try:
                times = child.cpu_times()
                worker += times.user + times.system
            except psutil.Error:
                pass
        mine, its = psutil.Process().cpu_times(), api.cpu_times()
        machine = psutil.cpu_times()
        busy = machine.user + machine.nice + machine.system + machine.irq + machine.softirq + machine.steal
        return {"client": mine.user + mine.system, "api": its.user + its.system, "worker": worker,
                "machine": busy}

    def start(self) -> None:
        self.before = self._read()

    def stop(self, into: dict[str, float]) -> None:
        after = self._read()
        if not after or not self.before:
            return
        spent = {part: after[part] - self.before[part] for part in after}
        spent["others"] = max(0.0, spent["machine"] - spent["client"] - spent["api"] - spent["worker"])
        for part, seconds in spent.items():
            into[part] = into.get(part, 0.0) + seconds


def load(model: LanguageModel, clients: int, per_client: int, outcome: Outcome, *, label: str = "",
         seconds: float | None = None) -> None:
    """``clients`` threads, each running ``per_client`` traces back to back (starting none after
    ``seconds``, if given; those in flight finish); adds to ``outcome``, comparing every result
    with ``outcome.reference``."""
    lock = threading.Lock()
    done = [0]
    gate = threading.Barrier(clients + 1)
    deadline = [math.inf]

    def client(index: int) -> None:
        gate.wait()
        for i in range(per_client):
            if time.perf_counter() >= deadline[0]:
                with lock:
                    outcome.capped = True
                break
            prompt = PROMPTS[(index + i) % len(PROMPTS)]
            try:
                logits, elapsed, _result = traced(model, prompt)
            except Exception as err:
                with lock:
                    outcome.failures += 1
                    outcome.first_failure = outcome.first_failure or f"{type(err).__name__}: {err}"
                continue
            size = 0  # unknown: a result does not say whether it shared a pass
            reference = outcome.reference.get(prompt)
            diff = (logits - reference).abs().max().item() if reference is not None else math.nan
            with lock:
                outcome.latencies.append(elapsed)
                done[0] += 1
                outcome.over += diff > TOLERANCE
                if not diff <= outcome.worst.get(prompt, (-1.0, 0))[0]:
                    outcome.worst[prompt] = (diff, size)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    total = clients * per_client
    started = time.perf_counter()
    if seconds is not None:
        deadline[0] = started + seconds
    gate.wait()
    next_report = started + 10.0
    while any(thread.is_alive() for thread in threads):
        for thread in threads:
            thread.join(0.2)
        if label and time.perf_counter() >= next_report:
            say(f"    {label}: {done[0]}/{total}, {done[0] / (time.perf_counter() - started):.1f}/s")
            next_report += 10.0
    outcome.seconds += time.perf_counter() - started
    outcome.requests += done[0]


def use(outcome: Outcome) -> None:
    assert outcome.server is not None
    CONFIG.HOST, CONFIG.API_KEY, CONFIG.STATUS = outcome.server.url, outcome.key, False


def launch(config: Config, model: LanguageModel, path: str, state: str, args: argparse.Namespace) -> Outcome:
    """Start the configuration's server (``outcome.error`` says why not)."""
    outcome = Outcome(config)
    name = model._remote_name()
    say(f"{config.label}: starting glassbox serve {' '.join(config.args(name, args.torch_threads))}")
    started = time.perf_counter()
    try:
        outcome.server = start_server({name: path}, args=config.args(name, args.torch_threads),
                                      state_dir=os.path.join(state, config.label.replace(" ", "")),
                                      timeout=args.start_timeout)
        outcome.key = outcome.server.create_key("throughput")
        say(f"{config.label}: up in {time.perf_counter() - started:.1f} s")
    except Exception as err:
        fail(outcome, err)
    return outcome


def warm_up(outcome: Outcome, model: LanguageModel, args: argparse.Namespace) -> None:
    """Each prompt alone once (its result is the reference every later one is compared with; the
    request the client sent is kept for ``profile_worker``), then a concurrent round."""
    say(f"{outcome.config.label}: warming up")
    try:
        use(outcome)
        for prompt in PROMPTS:  # one at a time: nothing to share a pass with
            logits, _, _result = traced(model, prompt)
            outcome.reference[prompt] = logits
            REQUESTS.setdefault(prompt, EXCHANGES.local.request)
        warm = Outcome(outcome.config, reference=outcome.reference)
        load(model, args.clients, args.warmup, warm)
        if warm.failures:
            raise RuntimeError(f"{warm.failures} warm-up requests failed; first: {warm.first_failure}")
    except Exception as err:
        fail(outcome, err)


def fail(outcome: Outcome, err: BaseException) -> None:
    outcome.error = _reason(err)
    say(f"{outcome.config.label}: not available ({outcome.error})")
    if "--debug" in sys.argv:
        traceback.print_exc()
    stop(outcome)


def stop(outcome: Outcome) -> None:
    if outcome.server is not None:
        outcome.server.stop()
        outcome.server = None


def measure_round(outcome: Outcome, model: LanguageModel, clients: int, per_client: int, round_no: int,
                  cap: float) -> None:
    assert outcome.server is not None
    use(outcome)
    label = f"{outcome.config.label}, round {round_no}"
    meter = CpuMeter(outcome.server)
    before = health_counts(outcome.server.url, outcome.key)
    requests, seconds = outcome.requests, outcome.seconds
    meter.start()
    load(model, clients, per_client, outcome, label=label, seconds=cap)
    meter.stop(outcome.cpu)
    after = health_counts(outcome.server.url, outcome.key)
    if before is None or after is None or outcome.health_batches is None:
        outcome.health_batches = None
        batches = jobs = 0
    else:
        batches, jobs = after[0] - before[0], after[1] - before[1]
        outcome.health_batches += batches
        outcome.batched_jobs += jobs
    n, s = outcome.requests - requests, outcome.seconds - seconds
    mean = n / (n - jobs + batches) if n and n - jobs + batches else float("nan")
    failed = f", {outcome.failures} failed so far (first: {outcome.first_failure})" * bool(outcome.failures)
    say(f"  {label}: {n} requests in {s:.1f} s = {n / s:.1f}/s, mean batch {mean:.2f}{failed}")


def run_group(configs: list[Config], model: LanguageModel, path: str,
              args: argparse.Namespace) -> list[Outcome]:
    """Start the group's servers, warm them, alternate measured rounds between them, stop them."""
    total, rounds = args.requests_per_client, args.rounds
    per_round = [total // rounds + (1 if r < total % rounds else 0) for r in range(rounds)]
    with tempfile.TemporaryDirectory(prefix="glassbox-throughput-") as state:
        outcomes: list[Outcome] = [Outcome(config) for config in configs]
        try:
            if configs[0].backend == "local":  # started side by side: loading is most of it
                threads = [threading.Thread(target=lambda i=i: outcomes.__setitem__(
                    i, launch(configs[i], model, path, state, args))) for i in range(len(configs))]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
            else:  # one private Ray instance at a time
                for i, config in enumerate(configs):
                    outcomes[i] = launch(config, model, path, state, args)
                    if outcomes[i].error:
                        break
            for outcome in outcomes:
                if outcome.server is not None:
                    warm_up(outcome, model, args)
            running = [o for o in outcomes if o.server is not None]
            if len(running) == len(configs):
                for round_no, share in enumerate(per_round, 1):
                    order = running if round_no % 2 else running[::-1]
                    for outcome in order:
                        if share:
                            measure_round(outcome, model, args.clients, share, round_no,
                                          args.seconds_per_config / rounds)
        finally:
            for outcome in outcomes:
                stop(outcome)
        error = next((o.error for o in outcomes if o.error), "")
        for outcome in outcomes:
            if not outcome.error and not outcome.requests:
                outcome.error = f"not measured: {error}" if error else "not measured"
        return outcomes


def _reason(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > 6:  # a server log: its first line and last few say what happened
        lines = [lines[0], "...", *lines[-4:]]
    return " | ".join(lines)[:600]


# ---------------------------------------------------------------- inside the worker


def profile_worker(path: str, name: str, threads: int, sizes: list[int], repeats: int) -> list[dict]:
    """Where the worker's time goes, measured in this process on the requests the client sent:
    ``child.handle_message`` (what the local worker and a Ray replica run per message) for one
    job and for batches of n, split into the jobs themselves and ``after_job`` (the weight check
    after every message). Run after the servers are stopped, so nothing else of ours competes."""
    from glassbox.remote.framing import frame
    from glassbox.server.config import ServerConfig
    from glassbox.server.jobs import executor
    from glassbox.server.workers import child

    torch.set_num_threads(threads)
    models = executor.load_models({name: path})
    requests = [REQUESTS[prompt].frame() for prompt in PROMPTS if prompt in REQUESTS]
    if not requests:
        return []
    config = ServerConfig(models={name: path})
    limits = {**config.limits(), "max_log_bytes": config.max_log_bytes}
    spent = [0.0]
    real_after_job = executor.after_job

    def after_job(models: dict) -> Any:
        started = time.perf_counter()
        try:
            return real_after_job(models)
        finally:
            spent[0] += time.perf_counter() - started

    def send(message: dict, blob: bytes = b"") -> None:
        frame(message, blob)  # what the pipe would carry

    rows = []
    executor.after_job = after_job  # handle_message looks it up on the module at call time
    try:
        for n in sizes:
            chosen = [requests[i % len(requests)] for i in range(n)]
            if n == 1:
                message = {"op": "job", "job": "j0", "limits": limits}
            else:
                message = {"op": "batch", "jobs": [f"j{i}" for i in range(n)],
                           "sizes": [len(r) for r in chosen], "limits": limits}
            blob = b"".join(chosen)
            totals, checks = [], []
            for i in range(repeats + 1):
                spent[0] = 0.0
                started = time.perf_counter()
                child.handle_message(executor, models, dict(message), blob, send)
                if i:  # the first is a warm-up
                    totals.append(time.perf_counter() - started)
                    checks.append(spent[0])
            total, check = statistics.median(totals), statistics.median(checks)
            rows.append({"n": n, "message_ms": 1000 * total, "after_job_ms": 1000 * check,
                         "jobs_ms": 1000 * (total - check), "per_request_ms": 1000 * total / n})
            say(f"worker profile: {n} request(s) per message: {1000 * total:.0f} ms "
                f"(after_job {1000 * check:.0f} ms)")
    finally:
        executor.after_job = real_after_job
    return rows


# ---------------------------------------------------------------- report


def report(outcomes: list[Outcome], args: argparse.Namespace, model_name: str) -> dict:
    print()
    print(f"co-tenant batching throughput: {model_name}, {args.clients} clients x {args.requests_per_client} "
          f"requests each at most ({args.rounds} alternating rounds, {args.seconds_per_config:g} s cap), "
          f"closed loop; --torch-threads {args.torch_threads}, OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY', '(unset)')}, {os.cpu_count()} CPUs, load average now "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    header = (f"{'configuration':<24}{'req/s':>7}{'done':>6}{'p50 ms':>8}{'p95 ms':>8}{'mean batch':>11}"
              f"{'batched':>9}{'health':>8}{'failed':>7} | {'CPU ms/req: client':>18}{'api':>6}{'worker':>8}"
              f"{'others':>8}{'others %':>10}")
    print(header)
    print("-" * len(header))
    for o in outcomes:
        if o.error:
            print(f"{o.config.label:<24} not available ({o.error})")
            continue
        health = "-" if o.health_batches is None else str(o.health_batches)
        capacity = o.seconds * (os.cpu_count() or 1)
        others = o.cpu.get("others", math.nan) / capacity if capacity else math.nan
        print(f"{o.config.label:<24}{o.throughput:>7.1f}{o.requests:>6}{o.latency_ms(0.5):>8.0f}"
              f"{o.latency_ms(0.95):>8.0f}{o.mean_batch:>11.2f}{o.batched_share:>9.0%}{health:>8}"
              f"{o.failures:>7} | "
              f"{o.cpu_ms('client'):>18.0f}{o.cpu_ms('api'):>6.0f}{o.cpu_ms('worker'):>8.0f}"
              f"{o.cpu_ms('others'):>8.0f}{others:>10.0%}")
    print("(done: requests measured, fewer than clients x requests where the time cap stopped a round;\n"
          " mean batch: requests per forward pass; batched: requests that shared one; health: batches\n"
          " of more than one job counted by /v1/health; CPU: CPU-ms per request spent by this client,\n"
          " the API process, the worker(s) and the rest of the machine; others %: the share of the\n"
          " machine's CPUs that processes not ours used meanwhile: other users add noise)")
    print()
    summary: dict[str, Any] = {"ratios": {}, "verdicts": {}, "parity": {}}
    for group in dict.fromkeys(o.config.group for o in outcomes):
        pair = {o.config.max_batch == 1: o for o in outcomes if o.config.group == group}
        off, on = pair.get(True), pair.get(False)
        if off is None or on is None or off.error or on.error:
            reason = next((o.error for o in (off, on) if o is not None and o.error), "not run")
            print(f"{group}: not available ({reason})")
            continue
        ratio = on.throughput / off.throughput
        verdict = "PASS" if ratio >= TARGET and not on.failures and not off.failures else "MISS"
        summary["ratios"][group], summary["verdicts"][group] = ratio, verdict
        print(f"{group}: throughput on/off = {on.throughput:.1f}/{off.throughput:.1f} req/s = {ratio:.2f}x "
              f"(target >= {TARGET:g}x): {verdict};  p50 latency on/off = "
              f"{on.latency_ms(0.5):.0f}/{off.latency_ms(0.5):.0f} ms")
    for o in outcomes:
        if o.error or not o.worst:
            continue
        worst = max(d for d, _ in o.worst.values())
        largest = max(r.abs().max().item() for r in o.reference.values())
        detail = ", ".join(f"{p!r} {d:.1e}" for p, (d, _) in o.worst.items())
        print(f"correctness, {o.config.label}: all {o.requests} results vs the same request alone: max abs "
              f"diff {worst:.2e}, {o.over} over {TOLERANCE:g} ({'PASS' if not o.over else 'MISS'}; "
              f"largest logit {largest:.1f}); worst per prompt: {detail}")
        summary["parity"][o.config.label] = {"max_abs_diff": worst, "over_tolerance": o.over}
    return summary


def print_profile(rows: list[dict], threads: int) -> None:
    print()
    print(f"inside the worker: worker.handle_message in this process, --torch-threads {threads}, median of 3")
    print(f"{'requests/message':>17}{'ms/message':>12}{'after_job ms':>14}{'jobs ms':>9}{'ms/request':>12}")
    for row in rows:
        print(f"{row['n']:>17}{row['message_ms']:>12.0f}{row['after_job_ms']:>14.0f}{row['jobs_ms']:>9.0f}"
              f"{row['per_request_ms']:>12.1f}")


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run in about a minute: tiny GPT-2, local backend, 4 clients x 2 "
                             "requests, 1 round, --profile-worker 1,2 (options given explicitly win)")
    parser.add_argument("--clients", type=int, help="concurrent client threads (default 16; --quick: 4)")
    parser.add_argument("--requests-per-client", type=int,
                        help="timed requests per client per configuration, over all rounds "
                             "(default 16; --quick: 2)")
    parser.add_argument("--seconds-per-config", type=float, default=30.0,
                        help="time cap per configuration, over all rounds: after it no new request "
                             "starts, those in flight finish (default 30)")
    parser.add_argument("--rounds", type=int,
                        help="measured rounds per configuration, alternating within a backend "
                             "(default 2; --quick: 1)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed requests per client first (default 1)")
    parser.add_argument("--backends",
                        help="comma-separated: local, ray (default both; --quick: local)")
    parser.add_argument("--ray-replicas", default="1",
                        help="comma-separated replica counts to run on the ray backend (default 1)")
    parser.add_argument("--torch-threads", type=int, default=torch.get_num_threads(),
                        help=f"torch threads of every server's worker (default: this machine's, "
                             f"{torch.get_num_threads()})")
    parser.add_argument("--start-timeout", type=float, default=180.0,
                        help="seconds a server may take to start (default 180)")
    parser.add_argument("--profile-worker", nargs="?", const="1,4,16",
                        help="afterwards, time the worker's message handling in this process for these "
                             "batch sizes (default when given: 1,4,16; --quick: 1,2)")
    parser.add_argument("--omp-wait-policy", choices=["PASSIVE", "ACTIVE"],
                        help="set OMP_WAIT_POLICY for the servers (and this process, which restarts "
                             "itself so that it applies); default: leave the environment as it is")
    parser.add_argument("--json", help="also write the numbers here")
    parser.add_argument("--debug", action="store_true", help="print tracebacks of failures")
    args = parser.parse_args(argv)
    for name, full, quick in (("clients", 16, 4), ("requests_per_client", 16, 2), ("rounds", 2, 1),
                              ("backends", "local,ray", "local"), ("profile_worker", "", "1,2")):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if args.omp_wait_policy and os.environ.get("OMP_WAIT_POLICY") != args.omp_wait_policy:
        # OpenMP reads it once, when torch is loaded: start again with it set (the servers inherit it).
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy
        os.execv(sys.executable, [sys.executable, os.path.abspath(__file__), *sys.argv[1:]])
    if args.clients < 1 or args.requests_per_client < 1 or args.rounds < 1:
        parser.error("--clients, --requests-per-client and --rounds must be positive")

    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = set(backends) - {"local", "ray"}
    if unknown:
        parser.error(f"unknown backend(s): {', '.join(sorted(unknown))}")
    groups: list[list[Config]] = []
    if "local" in backends:
        groups.append([Config("local, batching off", "local", 1), Config("local, batching on", "local", 0)])
    if "ray" in backends:
        for count in (int(n) for n in args.ray_replicas.split(",") if n.strip()):
            groups.append([Config(f"ray x{count}, batching off", "ray", 1, count),
                           Config(f"ray x{count}, batching on", "ray", 0, count)])

    path = tiny_gpt2_path() if args.quick else smollm2_path()
    model = LanguageModel(path)  # meta weights here: only its config and tokenizer are used
    if args.quick:
        say("quick mode: the tiny GPT-2, few requests; a check that the bench runs, not a measurement")
        if "ray" not in backends:
            say("quick mode: the ray backend left out (--backends local,ray to include it)")
    say(f"{sum(map(len, groups))} configurations; model {model._remote_name()} from {path}")
    EXCHANGES.install()
    outcomes: list[Outcome] = []
    try:
        for configs in groups:
            group = run_group(configs, model, str(path), args)
            outcomes += group
            if configs[0].backend == "ray" and any(o.error for o in group):
                error = next(o.error for o in group if o.error)
                print(f"ray backend: not available ({error})", flush=True)
                outcomes += [Outcome(c, error=error) for g in groups[groups.index(configs) + 1:] for c in g]
                break
    finally:
        EXCHANGES.uninstall()
    summary = report(outcomes, args, "tiny GPT-2 (--quick)" if args.quick else "SmolLM2-135M")
    if args.profile_worker and REQUESTS:
        sizes = [int(n) for n in args.profile_worker.split(",") if n.strip()]
        rows = profile_worker(str(path), model._remote_name(), args.torch_threads, sizes, repeats=3)
        summary["worker_profile"] = rows
        print_profile(rows, args.torch_threads)
    if args.json:
        rows = [{"configuration": o.config.label, "error": o.error, "requests": o.requests,
                 "failures": o.failures, "capped": o.capped, "seconds": o.seconds,
                 "requests_per_s": o.throughput,
                 "p50_ms": o.latency_ms(0.5), "p95_ms": o.latency_ms(0.95), "mean_batch": o.mean_batch,
                 "batched_share": o.batched_share, "health_batches": o.health_batches,
                 "cpu_ms_per_request": {p: o.cpu_ms(p) for p in ("client", "api", "worker", "others")},
                 "max_abs_diff": {p: d for p, (d, _) in o.worst.items()}, "over_tolerance": o.over}
                for o in outcomes]
        with open(args.json, "w") as file:
            json.dump({"rows": rows, **summary}, file, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
