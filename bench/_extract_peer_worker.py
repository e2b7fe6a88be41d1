"""nnsight 0.8.1 / TransformerLens 4.3 side of ``bench/extract.py``: runs in the peers virtualenv.

    .venv-peers/bin/python bench/_extract_peer_worker.py --library nnsight|transformer_lens \\
        --model-path DIR --corpus FILE --modules model.layers.1,model.layers.2 \\
        --batch-tokens 4096 --max-length 128 --threads 2

Runs the bench's extraction loop (``extract.write_loop``: the same texts, batches, rows, dtype
and files as its ``hooks_loop``) with the forward written in the library's own idiom:

    nnsight           ``with model.trace({input_ids, attention_mask, position_ids}) as tracer:``
                      ``layer.output.save()`` per module, then ``tracer.stop()`` (the forward
                      stops after the last module, as hooks and extract do). The model is
                      nnsight's ``TransformersModel`` over the local folder.
    transformer_lens  ``bridge.run_with_cache(input_ids, names_filter=[blocks.i.hook_out, ...],
                      attention_mask=, position_ids=, stop_at_layer=last + 1)``. TransformerLens
                      4.x removed ``HookedTransformer`` (``from_pretrained_no_processing``
                      included); its replacement is ``TransformerBridge.boot_transformers``, here
                      given the local folder and ``hf_model=`` the HF model loaded from it (no hub
                      call, raw HF weights: no LayerNorm folding), so ``blocks.i.hook_out`` is
                      layer i's output. Two differences are TransformerLens's own: the bridge
                      switches the model to eager attention (for its attention-pattern hooks),
                      and ``stop_at_layer`` stops *before* a block, so when the last module is
                      the final block nothing can be stopped; then the HF model is asked for
                      the logits of the last position only (``logits_to_keep=1``,
                      ``return_type=None``) rather than for every token's: the closest to "stop
                      after the last module" TransformerLens's call allows.

Protocol with the bench, one JSON document per line on stdout (``_peer.py``): after loading it
prints ``{"ready": true, "versions": ...}`` (or ``{"skipped": reason}``
and exits when the library cannot load the model offline); then reads commands on stdin:
``{"run": folder}`` (runs the whole corpus into that new folder, answered ``{"tokens", "seconds",
"tokens_per_s"}`` timed here, without the pipe) and ``{"results": true}`` or end of input (exits).
Progress goes to stderr; stdout carries only the protocol.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from importlib.metadata import version
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is a local folder: never download
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch

import _peer  # needs the path above
import extract as bench  # the bench's own loop: the same files by construction


def nnsight_forward(model_path: str, paths: list[str]) -> tuple[object, bench.Forward]:
    import warnings

    import nnsight
    from nnsight import TransformersModel
    from transformers import AutoTokenizer

    # nnsight's pipeline cannot infer the tiny model's tokenizer class: hand it the tokenizer.
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", nnsight.NNsightDeprecationWarning)
        model = TransformersModel(model_path, task="text-generation", tokenizer=tokenizer, dispatch=True)
    model._module.eval()
    envoys = [_envoy(model, p) for p in paths]

    def forward(input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> dict:
        # Bound before the trace and only filled inside it: nnsight 0.8.1 does not hand names
        # first bound inside a trace back to the enclosing function (see smollm2.py).
        saved: list = []
        with model.trace({"input_ids": input_ids, "attention_mask": mask, "position_ids": positions}) \
                as tracer:
            for envoy in envoys:
                saved.append(envoy.output.save())
            tracer.stop()
        return {p: (o[0] if isinstance(o, tuple) else o) for p, o in zip(paths, saved)}

    return tokenizer, forward


def _envoy(model: object, path: str) -> object:
    """``model.model.layers[1]`` from ``"model.layers.1"``: the envoy a user would write."""
    for part in path.split("."):
        model = model[int(part)] if part.isdigit() else getattr(model, part)
    return model


def transformer_lens_forward(model_path: str, paths: list[str]) -> tuple[object, bench.Forward]:
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForCausalLM, AutoTokenizer

    layers = []
    for path in paths:
        match = re.fullmatch(r"model\.layers\.(\d+)", path)
        if match is None:
            raise _Skip(f"module {path!r} is not a decoder layer: no TransformerLens hook name for it")
        layers.append(int(match.group(1)))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    hf = AutoModelForCausalLM.from_pretrained(model_path).eval()
    bridge = TransformerBridge.boot_transformers(model_path, hf_model=hf, tokenizer=tokenizer, device="cpu")
    names = [f"blocks.{i}.hook_out" for i in layers]
    if layers[-1] + 1 < len(bridge.blocks):
        stop = {"stop_at_layer": layers[-1] + 1}
    else:  # stop_at_layer stops before a block: none follows the last one (see the docstring)
        stop = {"return_type": None, "logits_to_keep": 1}

    def forward(input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> dict:
        _, cache = bridge.run_with_cache(input_ids, names_filter=names, attention_mask=mask,
                                         position_ids=positions, **stop)
        return {p: cache[name] for p, name in zip(paths, names)}

    return tokenizer, forward


class _Skip(Exception):
    """The library cannot run this extraction: the bench prints the reason and goes on without it."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--library", choices=["nnsight", "transformer_lens"], required=True)
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--corpus", required=True, help="one document per line (the bench's corpus file)")
    parser.add_argument("--modules", required=True, help="comma-separated module paths, in model order")
    parser.add_argument("--batch-tokens", type=int, required=True)
    parser.add_argument("--max-length", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True, help="torch threads: the bench's own")
    args = parser.parse_args()

    send = _peer.worker_protocol()
    torch.set_num_threads(args.threads)
    texts = Path(args.corpus).read_text().splitlines()
    paths = args.modules.split(",")
    versions = _peer.peer_versions()
    build = nnsight_forward if args.library == "nnsight" else transformer_lens_forward
    if args.library == "transformer_lens":
        versions["transformer_lens"] = version("transformer-lens")
    try:
        tokenizer, forward = build(args.model_path, paths)
    except _Skip as skip:
        send({"skipped": str(skip)})
        return
    except Exception as error:  # any load failure: a reason in the table, not a stack trace
        send({"skipped": f"cannot load {args.model_path} offline: {type(error).__name__}: {error}"})
        return

    def run(out: str) -> dict:
        started = time.perf_counter()
        tokens = bench.write_loop(tokenizer, texts, Path(out), args.batch_tokens, args.max_length, forward)
        seconds = time.perf_counter() - started
        return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}

    _peer.answer_commands(send, versions, "run", run)


if __name__ == "__main__":
    main()
