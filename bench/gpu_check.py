"""GPU checks: the core contract and co-tenant batching on CUDA, plus save-all overhead there.

Run on a machine with a CUDA GPU (the test suite never needs one):

    GLASSBOX_CACHE=<cache with gpt2-tokenizer> PYTHONPATH=src python bench/gpu_check.py
    .venv/bin/python bench/gpu_check.py --quick     # no GPU needed: every check on the CPU, ~20 s

Prints one line per check (PASS / FAIL / INFO with the numbers) and a timing table: bare
forward, plain hooks saving every layer, glassbox saving every layer, on a random-init Llama
(16 layers, hidden 1024) in bf16 and fp32. Exits 1 if a check fails.

``--quick`` (or the device ``cpu``) is a dry run of the script itself where there is no GPU:
every check runs with "cpu" in place of "cuda" (the trace check then compares the CPU with
itself; invokes, generation, gradients and co-tenant batches are checked for real), and the
timing table is printed from 3 rounds on the 4-layer tiny Llama. It says nothing about CUDA.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import traceback

import torch

import glassbox
from glassbox import LanguageModel
from glassbox.offline import tiny_llama_path

PROMPTS = ["The Eiffel Tower is in the city of", "Hello there", "A longer prompt with several more tokens"]
failures: list[str] = []
DEVICE = "cuda"  # main() sets it: "cpu" is a dry run of the script itself


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def check(name: str, ok: bool, detail: str = "") -> None:
    print(f"{'PASS' if ok else 'FAIL'}  {name}  {detail}", flush=True)
    if not ok:
        failures.append(name)


def guarded(fn):
    def run(*args):
        try:
            fn(*args)
        except Exception:
            check(fn.__name__, False, traceback.format_exc().strip().splitlines()[-1])
            traceback.print_exc()
    return run


@guarded
def trace_matches_cpu(cpu: LanguageModel, gpu: LanguageModel) -> None:
    values = []
    for model in (cpu, gpu):
        with model.trace(PROMPTS[0]):
            model.model.layers[1].output[:, -1] *= 2
            h = model.model.layers[2].output.save()
            logits = model.output.logits.save()
        values.append((h.float().cpu(), logits.float().cpu()))
    (h0, l0), (h1, l1) = values
    diff = max((h0 - h1).abs().max().item(), (l0 - l1).abs().max().item())
    check(f"trace on {DEVICE} equals cpu (edit + save)", diff < 1e-3, f"max |diff| {diff:.2e}")


@guarded
def invokes_equal_alone(gpu: LanguageModel) -> None:
    alone = []
    for prompt in PROMPTS:
        with gpu.trace(prompt):
            alone.append(gpu.output.logits[:, -1].save())
    batched = []
    with gpu.trace() as tracer:
        for prompt in PROMPTS:
            with tracer.invoke(prompt):
                batched.append(gpu.output.logits[:, -1].save())
    diff = max((a - b).abs().max().item() for a, b in zip(alone, batched))
    check(f"3 padded invokes on {DEVICE} equal each alone", diff < 1e-4, f"max |diff| {diff:.2e}")


@guarded
def generate_matches_hf(gpu: LanguageModel) -> None:
    with gpu.generate(PROMPTS[0], max_new_tokens=8, do_sample=False) as tracer:
        steps = glassbox.save([])
        with tracer.all():
            steps.append(gpu.lm_head.output[:, -1].argmax(-1))
    ids = gpu.tokenizer(PROMPTS[0], return_tensors="pt").to(DEVICE)
    expected = gpu._module.generate(**ids, max_new_tokens=8, do_sample=False,
                                    pad_token_id=gpu.tokenizer.eos_token_id)
    got = tracer.result[0].tolist()
    check(f"generate on {DEVICE}: tokens equal HF generate", got == expected[0].tolist(),
          f"{len(steps)} steps")


@guarded
def gradients(gpu: LanguageModel) -> None:
    with gpu.trace(PROMPTS[0]):
        h = gpu.model.layers[1].output
        h.retain_grad()
        gpu.output.logits[0, -1].sum().backward()
        grad = h.grad.save()
    check(f"retain_grad + backward on {DEVICE}", grad is not None and grad.abs().sum().item() > 0)
    with gpu.trace(PROMPTS[0]):
        h = gpu.model.layers[1].output
        with gpu.output.logits[0, -1].sum().backward():
            g = h.grad.save()
    diff = (g - grad).abs().max().item()
    check(f"`with loss.backward():` on {DEVICE} equals retain_grad", diff < 1e-5, f"max |diff| {diff:.2e}")


@guarded
def cotenant_batch(gpu: LanguageModel) -> None:
    from glassbox.remote.job import JobRequest
    from glassbox.remote.protocol import encode_values
    from glassbox.server.jobs.cotenant import run_batch
    from glassbox.server.jobs.execute import run_job

    models = {"m": gpu}
    source = "h = model.model.layers[1].output.save()\nlogits = model.output.logits.save()\n"
    items = []
    for prompt in PROMPTS:
        desc, blob = encode_values({"vars": {}, "inputs": [prompt], "call": {}})
        items.append(JobRequest(model="m", method="trace", source=source, model_refs={"model": ""},
                                values=desc, writes=("h", "logits"), returns=("h", "logits"), blob=blob))
    embedding = gpu._module.get_input_embeddings()
    passes: list[int] = []  # rows of every forward pass: one pass of 3 means they shared it
    hook = embedding.register_forward_hook(lambda module, args, out: passes.append(out.shape[0]))
    try:
        batched = run_batch(models, items, logs=[print] * 3, limits={})
    finally:
        hook.remove()
    worst = 0.0
    for item, result in zip(items, batched):
        alone = run_job(models, item, log=print, limits={})
        alone.raise_if_failed()
        result.raise_if_failed()
        a, b = alone.decoded()["saved"], result.decoded()["saved"]
        for name in ("h", "logits"):
            assert a[name].shape == b[name].shape, (a[name].shape, b[name].shape)
            worst = max(worst, (a[name] - b[name]).abs().max().item())
    check(f"co-tenant batch on {DEVICE} equals each alone", worst < 1e-4 and passes == [3],
          f"max |diff| {worst:.2e}, forward passes of {passes} rows")


def timing(dtype: torch.dtype, rounds: int = 30, quick: bool = False) -> None:
    path = tiny_llama_path() if quick else tiny_llama_path(n_layers=16, hidden=1024)
    model = LanguageModel(path, device_map=DEVICE, dtype=dtype, dispatch=True)
    module = model._module
    ids = model.tokenizer([PROMPTS[2]] * 8, return_tensors="pt").to(DEVICE)
    layers = list(module.model.layers)

    def bare():
        return module(**ids)

    def hooks():
        kept, handles = [], [m.register_forward_hook(lambda m, i, o: kept.append(o)) for m in layers]
        try:
            return module(**ids)
        finally:
            for handle in handles:
                handle.remove()

    def traced():
        with model.trace(ids["input_ids"]):
            kept = [layer.output.save() for layer in model.model.layers]
        return kept

    cases = {"bare": bare, "hooks save-all": hooks, "glassbox save-all": traced}
    times: dict[str, list[float]] = {name: [] for name in cases}
    with torch.no_grad():
        for _ in range(5):
            for fn in cases.values():
                fn()
        _sync()
        for _ in range(rounds):  # interleaved, so drift hits every case alike
            for name, fn in cases.items():
                start = time.perf_counter()
                fn()
                _sync()
                times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    print(f"INFO  timing {dtype!s:15s} " + "  ".join(f"{k} {v:.2f} ms" for k, v in med.items())
          + f"  glassbox/hooks {med['glassbox save-all'] / med['hooks save-all']:.3f}x", flush=True)


def main(argv: list[str] | None = None) -> int:
    global DEVICE
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("device", nargs="?", choices=["cuda", "cpu"],
                        help="where to run the checks (default cuda; --quick: cpu)")
    parser.add_argument("--quick", action="store_true",
                        help="a dry run without a GPU: every check on the CPU, timing from 3 rounds on "
                             "the 4-layer tiny Llama")
    args = parser.parse_args(argv)
    DEVICE = args.device or ("cpu" if args.quick else "cuda")
    if DEVICE == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA GPU here: run it on a GPU machine, or `--quick` for a dry run on the CPU")
    if DEVICE == "cpu":
        print("dry run on the CPU (--quick or device cpu): the script's checks and table, nothing about "
              "CUDA", flush=True)
    gpu_name = torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu"
    print(f"torch {torch.__version__}, {gpu_name}, glassbox {glassbox.__version__}")
    path = tiny_llama_path()
    cpu = LanguageModel(path, dispatch=True)
    gpu = LanguageModel(path, device_map=DEVICE, dispatch=True)
    trace_matches_cpu(cpu, gpu)
    invokes_equal_alone(gpu)
    generate_matches_hf(gpu)
    gradients(gpu)
    cotenant_batch(gpu)
    for dtype in (torch.float32, torch.bfloat16):
        try:
            timing(dtype, rounds=3 if args.quick else 30, quick=args.quick)
        except Exception:
            traceback.print_exc()
    print(f"{len(failures)} failed: {failures}" if failures else "all checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
