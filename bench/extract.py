"""extract() throughput, side by side: a plain HF loop with forward hooks writing the same files,
glassbox extract locally, and extract(remote=True) through a local server.

    .venv/bin/python bench/extract.py                        # tiny Llama (4 layers), ~65k tokens
    .venv/bin/python bench/extract.py --model smollm2 --documents 96
    .venv/bin/python bench/extract.py --rounds 5 --json out.json

Corpus: ``--documents`` lines of random words, each at least ``--max-length`` tokens (so every
batch is full: ``--batch-tokens / --max-length`` documents). Modules: three decoder layers at 1/4,
1/2 and 3/4 depth, all positions stored as bfloat16.

Variants (each writes a fresh folder per round; tokens/s counts real tokens):
    hooks     the loop a user writes without glassbox: tokenizer -> left-padded batch (packed the
              same way as extract) -> ``model(**batch)`` under ``torch.no_grad()`` with
              ``register_forward_hook`` on the three layers, stopping the forward after the last
              one (an exception from its hook, as extract stops after its last module), gathering
              the unpadded rows, ``safetensors.torch.save_file`` per batch plus a JSON index
    extract   ``glassbox.extract(...)``
    remote    ``glassbox.extract(..., remote=True)``: ``glassbox serve`` on 127.0.0.1 with this
              process's torch threads, 3 jobs in flight
    nnsight / TransformerLens: the same loop under nnsight 0.8.1 / TransformerLens 4.3 need
              ``.venv-peers`` (``bash bench/setup_peers.sh``); skipped, saying so, without it.
Before timing, hooks' and extract's shards are checked equal (same rows, same values). Variants
alternate in rotated order, round after round; reported: median tokens/s and the median of the
per-round ratios. Targets (the issue's): extract >= 0.95x hooks; remote >= 0.8x local extract.
Nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
PEERS_PYTHON = ROOT / ".venv-peers" / "bin" / "python"


class _Stop(Exception):
    """Raised by the last hook: the rest of the forward is not needed."""


def corpus(path: Path, documents: int, words: int) -> Path:
    rng = random.Random(0)
    vocabulary = ("the of and to in is was for on that with as by at from river model layer token paris "
                  "rome light stone water green quickly under over north south").split()
    path.write_text("".join(" ".join(rng.choice(vocabulary) for _ in range(words)) + "\n"
                            for _ in range(documents)))
    return path


def hooks_loop(hf: torch.nn.Module, tokenizer, texts: list[str], paths: list[str], out: Path,
               batch_tokens: int, max_length: int) -> int:
    """The plain loop: same packing, same rows, same files as extract."""
    out.mkdir(parents=True)
    modules = [hf.get_submodule(p) for p in paths]
    per_batch = batch_tokens // max_length  # every document is full length (see corpus)
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for path, module in zip(paths, modules):
        def hook(mod, args, output, path=path):
            captured[path] = output[0] if isinstance(output, tuple) else output
            if path == paths[-1]:
                raise _Stop
        handles.append(module.register_forward_hook(hook))
    tokens, shards, rows_done = 0, [], 0
    try:
        for number, start in enumerate(range(0, len(texts), per_batch)):
            chunk = texts[start:start + per_batch]
            ids = tokenizer(chunk, truncation=True, max_length=max_length)["input_ids"]
            width = max(len(r) for r in ids)
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in ids])
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in ids])
            with torch.no_grad():
                try:
                    positions = (mask.cumsum(-1) - 1).clamp(min=0)
                    hf(input_ids=input_ids, attention_mask=mask, position_ids=positions)
                except _Stop:
                    pass
            keep = mask.bool()
            tensors = {p: captured[p][keep].to(torch.bfloat16) for p in paths}
            document = torch.arange(start, start + len(chunk)).unsqueeze(1).expand_as(mask)[keep]
            position = (mask.cumsum(-1) - 1)[keep]
            tensors.update(document=document.contiguous(), position=position.contiguous())
            save_file(tensors, str(out / f"shard-{number:05d}.safetensors"))
            rows = int(keep.sum())
            name = f"shard-{number:05d}.safetensors"
            shards.append({"file": name, "rows": [rows_done, rows_done + rows]})
            rows_done += rows
            tokens += rows
            (out / "index.json").write_text(json.dumps({"shards": shards, "rows": rows_done}))
    finally:
        for handle in handles:
            handle.remove()
    return tokens


def same_files(a: Path, b: Path) -> str | None:
    names = sorted(p.name for p in a.glob("shard-*.safetensors"))
    if names != sorted(p.name for p in b.glob("shard-*.safetensors")):
        return "different shard files"
    for name in names:
        x, y = load_file(str(a / name)), load_file(str(b / name))
        if x.keys() != y.keys():
            return f"{name}: tensors {sorted(x)} vs {sorted(y)}"
        for key in x:
            if x[key].shape != y[key].shape or not torch.allclose(x[key].float(), y[key].float(), atol=1e-2):
                return f"{name}/{key} differs"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--documents", type=int, default=512)
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--no-remote", action="store_true")
    parser.add_argument("--json", help="also write every number here")
    options = parser.parse_args()

    from glassbox import CONFIG, LanguageModel, extract
    from glassbox.cli import start_server
    from glassbox.offline import smollm2_path, tiny_llama_path

    path = smollm2_path() if options.model == "smollm2" else tiny_llama_path()
    model = LanguageModel(path, dispatch=True)
    hf = model._module.eval()
    n = len(model.model.layers)
    paths = [f"model.layers.{i}" for i in (n // 4, n // 2, 3 * n // 4)]
    work = Path(tempfile.mkdtemp(prefix="bench-extract-"))
    source = corpus(work / "corpus.txt", options.documents, words=options.max_length + 40)
    texts = source.read_text().splitlines()
    common = {"modules": paths, "batch_tokens": options.batch_tokens, "max_length": options.max_length,
              "dtype": "bfloat16", "progress": False}
    print(f"model {path.name}, {len(texts)} documents x {options.max_length} tokens, modules {paths}, "
          f"batch_tokens {options.batch_tokens}, torch threads {torch.get_num_threads()}", file=sys.stderr)

    server = None
    if not options.no_remote:
        server = start_server({path.name: str(path)}, state_dir=str(work / "server"),
                              args=["--torch-threads", str(torch.get_num_threads())])
        CONFIG.HOST, CONFIG.API_KEY = server.url, server.create_key("bench")

    def run(variant: str, out: Path) -> int:
        if variant == "hooks":
            return hooks_loop(hf, model.tokenizer, texts, paths, out, options.batch_tokens,
                              options.max_length)
        ds = extract(model, source, out=out, remote=variant == "remote", **common)
        return int(ds.index["tokens"])

    variants = ["hooks", "extract"] + ([] if server is None else ["remote"])
    try:
        run("hooks", work / "check-hooks")  # warm-up, and the equal-work check
        run("extract", work / "check-extract")
        problem = same_files(work / "check-hooks", work / "check-extract")
        print(f"check hooks vs extract: {problem or 'same rows, same values'}", file=sys.stderr)
        rates: dict[str, list[float]] = {v: [] for v in variants}
        for round_ in range(options.rounds):
            order = variants[round_ % len(variants):] + variants[:round_ % len(variants)]
            for variant in order:
                out = work / f"{variant}-{round_}"
                started = time.perf_counter()
                tokens = run(variant, out)
                rates[variant].append(tokens / (time.perf_counter() - started))
                shutil.rmtree(out)
                print(f"round {round_} {variant}: {rates[variant][-1]:,.0f} tok/s", file=sys.stderr)
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)

    result = {"model": path.name, "tokens_per_round": len(texts) * options.max_length,
              "tokens_per_s": {v: statistics.median(r) for v, r in rates.items()},
              "extract_over_hooks": statistics.median(
                  e / h for e, h in zip(rates["extract"], rates["hooks"]))}
    if "remote" in rates:
        result["remote_over_extract"] = statistics.median(
            r / e for r, e in zip(rates["remote"], rates["extract"]))
    print("\n| variant | tokens/s |\n|---|---:|")
    for variant, rate in result["tokens_per_s"].items():
        print(f"| {variant} | {rate:,.0f} |")
    print(f"\nextract / hooks: {result['extract_over_hooks']:.3f}x (target >= 0.95)")
    if "remote_over_extract" in result:
        print(f"remote / local extract: {result['remote_over_extract']:.3f}x (target >= 0.8)")
    if not PEERS_PYTHON.exists():
        print(f"nnsight, TransformerLens: SKIPPED: {PEERS_PYTHON} is missing; create it with "
              "`bash bench/setup_peers.sh`")
    else:
        print("nnsight, TransformerLens: not run by this bench yet (see the closing note)")
    if options.json:
        Path(options.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
