"""Loading from the catalog vs a plain from_pretrained, and the memory a replica measures vs the plan.

    .venv/bin/python bench/catalog.py [--rounds 3]
    .venv/bin/python bench/catalog.py --quick     # smoke run: the tiny GPT-2, float32, 1 round

For SmolLM2 (float32 and bfloat16), each in a fresh process, alternating so that drift and the
page cache hit both alike (the checkpoint is read from the page cache after the first round):
- cold load: ``AutoModelForCausalLM.from_pretrained(path, dtype=)`` vs what a worker does for a
  catalog entry (``jobs/loading.load_model``: LanguageModel + weights sealed read-only + paths hidden);
- memory: the process's private resident memory (RssAnon: file pages of the checkpoint that the
  kernel can drop are not counted) grown by the worker's load, and its peak (sampled every 2 ms)
  through a 128-token trace, vs ``glassbox plan``'s estimate (sizing.estimate: weights x 1.15).
Prints medians and the ratios. ``--quick`` checks that the bench runs (every step, the table) on
the tiny GPT-2 in float32 with one round: its numbers are not SmolLM2's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CHILD = r"""
import json, sys, threading, time
spec = json.loads(sys.argv[1])
def anon():  # private memory: what the process really holds (file pages of the checkpoint are not)
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("RssAnon:"))
import torch, transformers  # imported before the clock starts: both sides need them
from glassbox.server.jobs import loading
before = anon()
start = time.perf_counter()
if spec["how"] == "plain":
    dtype = getattr(torch, spec["dtype"])
    model = transformers.AutoModelForCausalLM.from_pretrained(spec["path"], dtype=dtype)
else:
    model = loading.load_model("m", {"path": spec["path"], "options": {"dtype": spec["dtype"]}})
seconds = time.perf_counter() - start
loaded = anon() - before
peak = None
if spec["how"] == "catalog":
    samples, done = [], threading.Event()
    def sample():
        while not done.is_set():
            samples.append(anon())
            time.sleep(0.002)
    watcher = threading.Thread(target=sample)
    watcher.start()
    with model.trace(" ".join(["word"] * 127)):
        model.lm_head.output.save()
    done.set()
    watcher.join()
    peak = max(samples) - before
print(json.dumps({"seconds": seconds, "loaded": loaded, "peak": peak}))
"""


def run(how: str, path: str, dtype: str) -> dict:
    spec = json.dumps({"how": how, "path": path, "dtype": dtype})
    out = subprocess.run([sys.executable, "-c", CHILD, spec], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, help="default 3; --quick: 1")
    parser.add_argument("--quick", action="store_true", help="a smoke run: the tiny GPT-2, float32, 1 round")
    args = parser.parse_args()
    args.rounds = args.rounds or (1 if args.quick else 3)
    from glassbox.offline import smollm2_path, tiny_gpt2_path
    from glassbox.server.sizing import estimate

    path = str(tiny_gpt2_path() if args.quick else smollm2_path())
    name = "tiny GPT-2 (--quick)" if args.quick else "SmolLM2-135M"
    print(f"{name}, {args.rounds} rounds, each load in a fresh process\n")
    print(f"{'dtype':9s} {'from_pretrained':>16s} {'catalog load':>13s} {'ratio':>6s}   "
          f"{'plan estimate':>13s} {'measured load':>13s} {'peak (trace)':>12s} "
          f"{'load/est':>8s} {'peak/est':>8s}")
    for dtype in ("float32",) if args.quick else ("float32", "bfloat16"):
        plain, catalog = [], []
        for _ in range(args.rounds):
            plain.append(run("plain", path, dtype))
            catalog.append(run("catalog", path, dtype))
        p = statistics.median(r["seconds"] for r in plain)
        c = statistics.median(r["seconds"] for r in catalog)
        loaded = statistics.median(r["loaded"] for r in catalog)
        peak = statistics.median(r["peak"] for r in catalog)
        est = estimate("m", path, {"dtype": dtype}).runtime_bytes
        mib = 2**20
        print(f"{dtype:9s} {p:15.2f}s {c:12.2f}s {c / p:5.2f}x   {est / mib:10.0f} MiB "
              f"{loaded / mib:9.0f} MiB {peak / mib:8.0f} MiB {loaded / est:7.2f}x {peak / est:7.2f}x")


if __name__ == "__main__":
    main()
