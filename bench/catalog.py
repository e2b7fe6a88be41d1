"""Loading from the catalog vs a plain from_pretrained, and a worker's memory vs ``glassbox plan``.

    .venv/bin/python bench/catalog.py [--rounds 3] [--tokens 128] [--batch 1]
    .venv/bin/python bench/catalog.py --quick     # smoke run: the tiny models, 1 round

For each model (the tiny GPT-2 and tiny Llama in float32, SmolLM2 in float32 and bfloat16), each
round in fresh processes, alternating so that drift and the page cache hit all alike:
- cold load: ``AutoModelForCausalLM.from_pretrained(path, dtype=)`` vs what a worker does for a
  catalog entry (``jobs/loading.load_model``: LanguageModel + weights sealed read-only + paths hidden);
- memory: the whole process's resident set (VmRSS, what ``ps`` shows, what sizing.py models) of a
  process that does what a worker does: idle (the executor imported, ``prepare_later_loads`` run,
  one torch thread), loaded (``load_model``), and its peak (VmHWM, reset after loading) through a
  trace of ``--tokens`` x ``--batch`` with gradients on, as jobs run; vs ``sizing.estimate``'s
  loaded and peak for that job.
Prints medians, the ratios estimate / measured, and whether every row is within 15%; exits 1 if
one is not (not with --quick: a smoke run on other machines, whose libraries differ).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

BAND = 0.15

CHILD = r"""
import json, sys, threading
spec = json.loads(sys.argv[1])
def status(key):  # kB lines of /proc/self/status
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":"))
import time, torch, transformers
from glassbox.remote.executor import DEFAULT_EXECUTOR, load_executor
torch.set_num_threads(1)  # a worker under process isolation loads with one thread (workers/child.py)
executor = load_executor(DEFAULT_EXECUTOR)
executor.prepare_later_loads()  # the loading stack imported before the clock starts, on both sides
idle = status("VmRSS")
if spec["how"] == "plain":
    start = time.perf_counter()
    transformers.AutoModelForCausalLM.from_pretrained(spec["path"], dtype=getattr(torch, spec["dtype"]))
    print(json.dumps({"seconds": time.perf_counter() - start}))
    sys.exit()
start = time.perf_counter()
model = executor.load_model("m", {"path": spec["path"], "options": {"dtype": spec["dtype"]}})
seconds = time.perf_counter() - start
loaded = status("VmRSS")
prompts = [" ".join(["word"] * spec["tokens"])] * spec["batch"]
tokens = len(model.tokenizer(prompts[0])["input_ids"])
try:  # the peak of the trace alone: reset the high-water mark the load left
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    sampled = None
except OSError:  # not allowed here: sample the resident set instead (may miss a short peak)
    sampled, done = [], threading.Event()
    def sample():
        while not done.is_set():
            sampled.append(status("VmRSS"))
            time.sleep(0.001)
    watcher = threading.Thread(target=sample)
    watcher.start()
with model.trace(prompts):
    model.lm_head.output.save()
if sampled is not None:
    done.set()
    watcher.join()
peak = status("VmHWM") if sampled is None else max(sampled)
print(json.dumps({"seconds": seconds, "idle": idle, "loaded": loaded, "peak": peak, "tokens": tokens}))
"""


def run(how: str, path: str, dtype: str, tokens: int = 0, batch: int = 1) -> dict:
    spec = json.dumps({"how": how, "path": path, "dtype": dtype, "tokens": tokens, "batch": batch})
    out = subprocess.run([sys.executable, "-c", CHILD, spec], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"the {how} load of {path} ({dtype}) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, help="default 3; --quick: 1")
    parser.add_argument("--tokens", type=int, default=128, help="tokens of the traced job (default 128)")
    parser.add_argument("--batch", type=int, default=1, help="sequences in it (default 1)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: the tiny models, 1 round")
    args = parser.parse_args()
    args.rounds = args.rounds or (1 if args.quick else 3)
    from glassbox.offline import smollm2_path, tiny_gpt2_path, tiny_llama_path
    from glassbox.server.sizing import PROCESS_BYTES, estimate

    models = [("tiny GPT-2", str(tiny_gpt2_path()), "float32"),
              ("tiny Llama", str(tiny_llama_path()), "float32")]
    if not args.quick:
        models += [("SmolLM2-135M", str(smollm2_path()), dtype) for dtype in ("float32", "bfloat16")]
    mib = 2**20
    print(f"{args.rounds} round(s), each load in a fresh process; a trace of {args.tokens} tokens x batch "
          f"{args.batch}, gradients on; memory: the process's RSS, MiB; ratio: estimate / measured\n")
    header = (f"{'model':13s} {'dtype':9s} {'from_pretrained':>15s} {'catalog load':>12s} {'ratio':>5s}  "
              f"{'idle':>5s}  {'loaded est':>10s} {'measured':>8s} {'ratio':>5s}  "
              f"{'peak est':>8s} {'measured':>8s} {'ratio':>5s}")
    print(header)
    print("-" * len(header))
    worst, idles = 0.0, []
    for label, path, dtype in models:
        plain, catalog = [], []
        for _ in range(args.rounds):
            plain.append(run("plain", path, dtype))
            catalog.append(run("catalog", path, dtype, args.tokens, args.batch))
        p = statistics.median(r["seconds"] for r in plain)
        c = statistics.median(r["seconds"] for r in catalog)
        idle, loaded, peak = (statistics.median(r[k] for r in catalog) for k in ("idle", "loaded", "peak"))
        idles.append(idle)
        size = estimate("m", path, {"dtype": dtype}, tokens=catalog[0]["tokens"], batch=args.batch)
        load_ratio, peak_ratio = size.loaded_bytes / loaded, size.peak_bytes / peak
        worst = max(worst, abs(load_ratio - 1), abs(peak_ratio - 1))
        print(f"{label:13s} {dtype:9s} {p:14.2f}s {c:11.2f}s {c / p:4.2f}x  {idle / mib:5.0f}  "
              f"{size.loaded_bytes / mib:10.0f} {loaded / mib:8.0f} {load_ratio:4.2f}x  "
              f"{size.peak_bytes / mib:8.0f} {peak / mib:8.0f} {peak_ratio:4.2f}x")
    within = worst <= BAND
    print(f"\nidle worker measured {statistics.median(idles) / mib:.0f} MiB (sizing.PROCESS_BYTES: "
          f"{PROCESS_BYTES / mib:.0f}); every row within {BAND:.0%}: {'yes' if within else 'NO'} "
          f"(worst {worst:.1%})")
    return 0 if within or args.quick else 1


if __name__ == "__main__":
    sys.exit(main())
