"""Memory of a model's Ray replicas on one machine: a private copy each, against one copy shared
through ``--share-weights``, one after the other in one run.

    .venv/bin/python bench/shared_weights.py                  # SmolLM2-135M, 2 replicas
    .venv/bin/python bench/shared_weights.py --replicas 3
    .venv/bin/python bench/shared_weights.py --quick          # smoke run: the tiny GPT-2

For each mode a real ``glassbox serve --backend ray`` (a private Ray instance, the default
isolation) serves the replicas; a few traces go through the client (``remote=True``) so that every
replica has run a forward, and they are checked equal to a local run. Then the PSS (proportional
set size: a page shared by k processes counts 1/k in each) is summed over every process of the
server's tree: the API process, Ray's own processes, the replicas, their workers, zygotes and
hosts (``/proc/PID/smaps_rollup``). Printed: the total per mode, what sharing saved, and the
model's weight bytes for scale (the saving should be about (replicas - 1) x that).

What it costs: a plain trace runs its forward in a long-lived host process, whichever the mode;
a job that runs in a process of its own (generation, gradients, invokes, sessions, ``.source``)
forks from a process that maps the weights, and the kernel does not copy a shared mapping's page
tables at fork: that process faults the weights in again. Measured side by side: two local
servers, one of each mode, the same 2-token ``generate`` through the client alternating between
them (``--runs`` each, the first two dropped), medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

from glassbox import CONFIG, LanguageModel
from glassbox.cli import start_server
from glassbox.envoy import module_of
from glassbox.offline import smollm2_path, tiny_gpt2_path

PROMPTS = ["The Eiffel Tower is in the city of", "Hello there", "A longer prompt with more tokens in it"]


def pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def tree_pss_mib(pid: int) -> tuple[float, int]:
    """Summed PSS (MiB) of a process and all its descendants, and how many processes."""
    root = psutil.Process(pid)
    processes = [root, *root.children(recursive=True)]
    return sum(pss_kib(p.pid) for p in processes) / 1024, len(processes)


def measure(path: Path, replicas: int, share: str | None, state: str) -> tuple[float, int]:
    args = ["--backend", "ray", "--replicas", f"{path.name}={replicas}", "--max-batch", "1",
            "--torch-threads", str(torch.get_num_threads())]
    if share:
        args += ["--share-weights", share]
    running = start_server({path.name: str(path)}, state_dir=state, args=args)
    old = CONFIG.HOST, CONFIG.API_KEY
    CONFIG.HOST, CONFIG.API_KEY = running.url, running.create_key("bench")
    try:
        model = LanguageModel(str(path), dispatch=True)
        for prompt in PROMPTS * replicas:  # jobs go to free replicas: every one runs some
            with model.trace(prompt):
                local = model.output.logits.save()
            with model.trace(prompt, remote=True):
                remote = model.output.logits.save()
            if not torch.equal(local, remote):
                raise SystemExit(f"remote differs from local by {(local - remote).abs().max():.3g}")
        return tree_pss_mib(running.process.pid)
    finally:
        CONFIG.HOST, CONFIG.API_KEY = old
        running.stop()


def own_process_ms(path: Path, runs: int, tmp: str) -> tuple[float, float]:
    """Median ms of a remote 2-token generate on a private-copy server and a shared-file one."""
    common = ["--max-batch", "1", "--torch-threads", str(torch.get_num_threads())]
    servers = [start_server({path.name: str(path)}, state_dir=os.path.join(tmp, "job-private"), args=common)]
    try:
        servers.append(start_server({path.name: str(path)}, state_dir=os.path.join(tmp, "job-shared"),
                                    args=[*common, "--share-weights", os.path.join(tmp, "job-weights")]))
        keys = [s.create_key("bench") for s in servers]
        model = LanguageModel(str(path), dispatch=True)
        times: list[list[float]] = [[], []]
        old = CONFIG.HOST, CONFIG.API_KEY
        try:
            for run in range(runs + 2):
                for which in ((0, 1) if run % 2 else (1, 0)):
                    CONFIG.HOST, CONFIG.API_KEY = servers[which].url, keys[which]
                    start = time.perf_counter()
                    with model.generate(PROMPTS[0], max_new_tokens=2, remote=True):
                        model.lm_head.output.save()
                    times[which].append(time.perf_counter() - start)
        finally:
            CONFIG.HOST, CONFIG.API_KEY = old
        private, shared = (statistics.median(t[2:]) * 1e3 for t in times)
        return private, shared
    finally:
        for server in servers:
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--runs", type=int, default=20, help="generate jobs per mode (side by side)")
    parser.add_argument("--quick", action="store_true", help="smoke run on the tiny GPT-2")
    args = parser.parse_args()
    path = tiny_gpt2_path() if args.quick else smollm2_path()
    loaded = module_of(LanguageModel(str(path), dispatch=True))
    weights = sum(p.numel() * p.element_size() for p in loaded.parameters())
    print(f"# {path.name}: {args.replicas} Ray replicas on one machine, weights {weights / 2**20:.1f} MiB "
          f"(fp32 as loaded), torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory(prefix="glassbox-bench-share-") as tmp:
        private, count = measure(path, args.replicas, None, os.path.join(tmp, "private"))
        print(f"private copies: {private:.0f} MiB over {count} processes", flush=True)
        folder = os.path.join(tmp, "weights")
        shared, count = measure(path, args.replicas, folder, os.path.join(tmp, "shared"))
        print(f"shared file: {shared:.0f} MiB over {count} processes", flush=True)
        job_private, job_shared = own_process_ms(path, 2 if args.quick else args.runs, tmp)
    saved = private - shared
    print()
    print("| mode | server tree PSS (MiB) | saved (MiB) | saved / weights |")
    print("|---|---:|---:|---:|")
    print(f"| a private copy per replica | {private:.0f} | | |")
    print(f"| --share-weights | {shared:.0f} | {saved:.0f} | {saved / (weights / 2**20):.2f}x |")
    print()
    print("| job in a process of its own (generate 2 tokens, remote) | private copy ms | shared file ms "
          "| shared - private ms |")
    print("|---|---:|---:|---:|")
    print(f"| {path.name}, median | {job_private:.1f} | {job_shared:.1f} | {job_shared - job_private:+.1f} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
