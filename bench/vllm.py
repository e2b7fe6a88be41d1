"""glassbox on vLLM vs raw vLLM with a plain forward hook vs glassbox on Hugging Face, in one run.

    bash scripts/setup_vllm.sh && .venv-vllm/bin/python bench/vllm.py [--rounds 5] [--tokens 20]
    .venv-vllm/bin/python bench/vllm.py --quick    # smoke run: a 4-layer tiny Llama, 1 round, 4 tokens

Two cases, both generating ``--tokens`` greedy tokens for each of 4 prompts on SmolLM2-135M (float32):
    steer   add a steering vector to layer 15's output (its hidden part) at every step
    save    keep layer 15's output at every step
Variants (interleaved rounds; each cell is the median seconds of one generation of all 4 prompts):
    vllm          raw vLLM, no hook (for reference)
    vllm+hook     raw vLLM with a plain torch forward hook doing the same work on the whole slab
    glassbox      glassbox.VLLM: one invoke per prompt, ``for step in tracer.iter[:]`` in each
    glassbox-hf   glassbox.LanguageModel.generate on the same checkpoint, one invoke per prompt
Targets (DESIGN / issue 12): glassbox <= 1.10x vllm+hook, and faster than glassbox-hf. The generated
tokens of vllm+hook and glassbox are checked to be equal before anything is timed.
``--quick`` checks that the bench runs (engine, checks, rounds, table), not its numbers: a tiny
Llama (``glassbox.offline.tiny_llama_path(hidden=128)``: 4 layers, 4 heads of width 32, the narrowest
vLLM's CPU attention takes; the default tiny Llama's width 16 it refuses), hooked at layer 2, 1 round
of 4 tokens.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

# Run as a script, this file's folder comes first on sys.path, where this very file would be found as
# `vllm`: drop the folder so that `import vllm` finds the engine.
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]

PROMPTS = [
    "The capital of France is",
    "The Colosseum is in the city of",
    "My favourite way to spend a Sunday is",
    "In 1969 the first people to walk on the moon were",
]
LAYER = 15
QUICK_HIDDEN = 128  # --quick's tiny Llama: 4 heads of 32 (vLLM's CPU attention has no head size under 32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, help="default 5; --quick: 1")
    parser.add_argument("--tokens", type=int, help="default 20; --quick: 4")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: a 4-layer tiny Llama, 1 round of 4 tokens")
    args = parser.parse_args()
    args.rounds = args.rounds or (1 if args.quick else 5)
    args.tokens = args.tokens or (4 if args.quick else 20)
    torch.set_num_threads(1)

    import glassbox
    from glassbox.offline import smollm2_path, tiny_llama_path
    from vllm import SamplingParams

    path = str(tiny_llama_path(hidden=QUICK_HIDDEN) if args.quick else smollm2_path())
    name = "tiny Llama (--quick)" if args.quick else "SmolLM2-135M"
    layer_index = 2 if args.quick else LAYER
    vmodel = glassbox.VLLM(path, dtype="float32", max_model_len=256, dispatch=True)
    hf = glassbox.LanguageModel(path, dispatch=True)
    llm, n = vmodel.llm, args.tokens
    steer = torch.randn(hf.config.hidden_size, generator=torch.Generator().manual_seed(0)) * 0.05
    params = SamplingParams(temperature=0.0, max_tokens=n)
    layer = vmodel.engine.model.model.layers[layer_index]

    def raw() -> list[list[int]]:
        return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]

    def raw_hook(case: str) -> Callable[[], list[list[int]]]:
        def run() -> list[list[int]]:
            kept = []

            def hook(module, inputs, output):
                if case == "steer":
                    output[0].add_(steer)
                else:
                    kept.append(output[0])

            handle = layer.register_forward_hook(hook)
            try:
                return raw()
            finally:
                handle.remove()

        return run

    def traced(case: str) -> Callable[[], list[list[int]]]:
        def run() -> list[list[int]]:
            with vmodel.trace(temperature=0.0, max_tokens=n) as tracer:
                for prompt in PROMPTS:
                    with tracer.invoke(prompt):
                        kept = []
                        for _ in tracer.iter[:]:
                            if case == "steer":
                                vmodel.model.layers[layer_index].output[0][:] += steer
                            else:
                                kept.append(vmodel.model.layers[layer_index].output[0].save())
            return [c.token_ids for c in tracer.result]

        return run

    def traced_hf(case: str) -> Callable[[], list[list[int]]]:
        def run() -> list[list[int]]:
            with hf.generate(max_new_tokens=n, do_sample=False) as tracer:
                for prompt in PROMPTS:
                    with tracer.invoke(prompt):
                        kept = []
                        for _ in tracer.iter[:]:
                            if case == "steer":
                                hf.model.layers[layer_index].output[:] += steer
                            else:
                                kept.append(hf.model.layers[layer_index].output.save())
            return tracer.result.tolist()

        return run

    cases = ("steer", "save")
    variants: dict[tuple[str, str], Callable[[], object]] = {}
    for case in cases:
        variants[(case, "vllm")] = raw
        variants[(case, "vllm+hook")] = raw_hook(case)
        variants[(case, "glassbox")] = traced(case)
        variants[(case, "glassbox-hf")] = traced_hf(case)
        hooked, ours = variants[(case, "vllm+hook")](), variants[(case, "glassbox")]()
        if [list(t) for t in hooked] != [list(t) for t in ours]:
            raise SystemExit(f"{case}: glassbox and the raw hook generated different tokens")

    times: dict[tuple[str, str], list[float]] = {key: [] for key in variants}
    for _ in range(args.rounds):
        for key, run in variants.items():
            start = time.perf_counter()
            run()
            times[key].append(time.perf_counter() - start)

    print(f"{name} float32, layer {layer_index}, {len(PROMPTS)} prompts x {n} tokens, 1 torch thread, "
          f"median of {args.rounds} rounds (seconds per generation)")
    print(f"{'case':<6} {'vllm':>8} {'vllm+hook':>10} {'glassbox':>9} {'glassbox-hf':>12} "
          f"{'glassbox/hook':>14} {'glassbox/hf':>12}")
    for case in cases:
        m = {v: statistics.median(times[(case, v)]) for v in ("vllm", "vllm+hook", "glassbox", "glassbox-hf")}
        print(f"{case:<6} {m['vllm']:>8.3f} {m['vllm+hook']:>10.3f} {m['glassbox']:>9.3f} "
              f"{m['glassbox-hf']:>12.3f} {m['glassbox'] / m['vllm+hook']:>13.2f}x "
              f"{m['glassbox'] / m['glassbox-hf']:>11.2f}x")


if __name__ == "__main__":
    main()
