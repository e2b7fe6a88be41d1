"""extract() throughput, side by side: a plain HF loop with forward hooks writing the same files,
glassbox extract locally, extract(remote=True) through a local server, and the same loop in nnsight
and TransformerLens.

    .venv/bin/python bench/extract.py                        # tiny Llama (4 layers), ~65k tokens
    .venv/bin/python bench/extract.py --model smollm2 --documents 96
    .venv/bin/python bench/extract.py --rounds 5 --json out.json
    .venv/bin/python bench/extract.py --no-peers --no-remote         # hooks and extract only
    .venv/bin/python bench/extract.py --quick     # smoke run: 16 documents x 32 tokens, 1 round

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
    nnsight   the same loop (``write_loop``: same batches, rows, dtype, files) with the forward
              written ``with model.trace(batch) as tracer: layer.output.save() ...; tracer.stop()``
              under nnsight 0.8.1
    TransformerLens  the same loop with ``bridge.run_with_cache(ids, names_filter=[blocks.i.hook_out
              ...], stop_at_layer=...)`` under TransformerLens 4.3 (its ``TransformerBridge`` over
              the same local weights; see ``_extract_peer_worker.py`` for what it cannot stop)
The last two run in ``.venv-peers`` (``bash bench/setup_peers.sh``), one worker process each,
driven one round at a time through ``_peer.py`` and timed inside the worker (the pipe is not
counted); without the venv (or with ``--no-peers``) their rows say SKIPPED and why.
Before timing, every variant's warm-up folder is checked equal to hooks' (same rows, same values).
Variants alternate in rotated order, round after round; reported: median tokens/s and the median
of the per-round ratios. Targets (the issue's): extract >= 0.95x hooks; remote >= 0.8x local
extract. Nothing here asserts on time.
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
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import _peer  # bench/ is on the path: this script's folder (and the worker puts it there)

ROOT = Path(__file__).resolve().parent.parent
PEERS_PYTHON = Path(_peer.PEERS_PYTHON)
WORKER = str(Path(__file__).resolve().parent / "_extract_peer_worker.py")


class _Stop(Exception):
    """Raised by the last hook: the rest of the forward is not needed."""


def corpus(path: Path, documents: int, words: int) -> Path:
    rng = random.Random(0)
    vocabulary = ("the of and to in is was for on that with as by at from river model layer token paris "
                  "rome light stone water green quickly under over north south").split()
    path.write_text("".join(" ".join(rng.choice(vocabulary) for _ in range(words)) + "\n"
                            for _ in range(documents)))
    return path


Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]


def write_loop(tokenizer, texts: list[str], out: Path, batch_tokens: int, max_length: int,
               forward: Forward) -> int:
    """Tokenize, pack, run, gather the real tokens, write a shard per batch plus the index.

    ``forward(input_ids, attention_mask, position_ids)`` returns ``{module path: [batch, width,
    hidden]}``; it is the only part the plain-hooks, nnsight and TransformerLens loops write
    differently (``_extract_peer_worker.py`` imports this function), so any gap between them is
    the library's, and ``same_files`` can compare their folders. Packing is extract's: left
    padding, ``batch_tokens // max_length`` documents per batch (every document is full length,
    see ``corpus``), positions counted from each document's first real token."""
    out.mkdir(parents=True)
    per_batch = batch_tokens // max_length
    tokens, shards, rows_done = 0, [], 0
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for number, start in enumerate(range(0, len(texts), per_batch)):
        chunk = texts[start:start + per_batch]
        ids = tokenizer(chunk, truncation=True, max_length=max_length)["input_ids"]
        width = max(len(r) for r in ids)
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in ids])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in ids])
        with torch.no_grad():
            captured = forward(input_ids, mask, (mask.cumsum(-1) - 1).clamp(min=0))
        keep = mask.bool()
        tensors = {p: t[keep].to(torch.bfloat16) for p, t in captured.items()}
        document = torch.arange(start, start + len(chunk)).unsqueeze(1).expand_as(mask)[keep]
        position = (mask.cumsum(-1) - 1)[keep]
        tensors.update(document=document.contiguous(), position=position.contiguous())
        name = f"shard-{number:05d}.safetensors"
        save_file(tensors, str(out / name))
        rows = int(keep.sum())
        shards.append({"file": name, "rows": [rows_done, rows_done + rows]})
        rows_done += rows
        tokens += rows
        (out / "index.json").write_text(json.dumps({"shards": shards, "rows": rows_done}))
    return tokens


def hooks_loop(hf: torch.nn.Module, tokenizer, texts: list[str], paths: list[str], out: Path,
               batch_tokens: int, max_length: int) -> int:
    """The plain loop: same packing, same rows, same files as extract."""
    modules = [hf.get_submodule(p) for p in paths]
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for path, module in zip(paths, modules):
        def hook(mod, args, output, path=path):
            captured[path] = output[0] if isinstance(output, tuple) else output
            if path == paths[-1]:
                raise _Stop
        handles.append(module.register_forward_hook(hook))

    def forward(input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> dict:
        captured.clear()
        try:
            hf(input_ids=input_ids, attention_mask=mask, position_ids=positions)
        except _Stop:
            pass
        return {p: captured[p] for p in paths}

    try:
        return write_loop(tokenizer, texts, out, batch_tokens, max_length, forward)
    finally:
        for handle in handles:
            handle.remove()


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


# (label in the table, --library of the worker)
PEERS = [("nnsight", "nnsight"), ("TransformerLens", "transformer_lens")]


def start_peers(path: Path, source: Path, paths: list[str], options: argparse.Namespace,
                skipped: dict[str, str]) -> dict[str, _peer.PeerProcess]:
    """One worker per peer library, each loaded and waiting; a peer that cannot run goes to
    ``skipped`` with the reason. Started before any timing: loading does not overlap a round."""
    peers = {}
    for label, library in PEERS:
        peer = _peer.PeerProcess.launch(WORKER, [
            "--library", library, "--model-path", str(path), "--corpus", str(source),
            "--modules", ",".join(paths), "--batch-tokens", str(options.batch_tokens),
            "--max-length", str(options.max_length), "--threads", str(torch.get_num_threads()),
        ], name=label)
        ready = peer.ask(None) if peer is not None else None
        if ready is None:
            skipped[label] = "the worker stopped while loading (its error is above)"
        elif "skipped" in ready:
            skipped[label] = ready["skipped"]
            peer.process.wait()
        else:
            peer.versions = ready["versions"]
            peers[label] = peer
    return peers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--documents", type=int, help="default 512; --quick: 16")
    parser.add_argument("--batch-tokens", type=int, help="default 4096; --quick: 256")
    parser.add_argument("--max-length", type=int, help="default 128; --quick: 32")
    parser.add_argument("--rounds", type=int, help="default 6; --quick: 1")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run of every variant: 16 documents x 32 tokens in batches of 256 "
                             "tokens, 1 round (options given explicitly win)")
    parser.add_argument("--no-remote", action="store_true")
    parser.add_argument("--no-peers", action="store_true", help="skip nnsight and TransformerLens")
    parser.add_argument("--json", help="also write every number here")
    options = parser.parse_args()
    for name, full, quick in (("documents", 512, 16), ("batch_tokens", 4096, 256), ("max_length", 128, 32),
                              ("rounds", 6, 1)):
        if getattr(options, name) is None:
            setattr(options, name, quick if options.quick else full)

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
    skipped: dict[str, str] = {}
    peers: dict[str, _peer.PeerProcess] = {}
    if options.no_peers:
        skipped = {label: "--no-peers" for label, _ in PEERS}
    elif not PEERS_PYTHON.exists():
        skipped = {label: f"{PEERS_PYTHON} is missing; create it with `bash bench/setup_peers.sh`"
                   for label, _ in PEERS}
    else:
        peers = start_peers(path, source, paths, options, skipped)
    if not options.no_remote:
        server = start_server({path.name: str(path)}, state_dir=str(work / "server"),
                              args=["--torch-threads", str(torch.get_num_threads())])
        CONFIG.HOST, CONFIG.API_KEY = server.url, server.create_key("bench")

    def run(variant: str, out: Path) -> float:
        """One whole extraction into ``out``; its tokens/s."""
        if variant in peers:  # timed in the worker, so the pipe and JSON are not counted
            answer = peers[variant].ask({"run": str(out)})
            if answer is None:
                raise SystemExit(f"{variant}: the worker stopped mid-run (its error is above)")
            return float(answer["tokens_per_s"])
        started = time.perf_counter()
        if variant == "hooks":
            tokens = hooks_loop(hf, model.tokenizer, texts, paths, out, options.batch_tokens,
                                options.max_length)
        else:
            ds = extract(model, source, out=out, remote=variant == "remote", **common)
            tokens = int(ds.index["tokens"])
        return tokens / (time.perf_counter() - started)

    variants = ["hooks", "extract"] + ([] if server is None else ["remote"]) + list(peers)
    checks: dict[str, str] = {}
    try:
        run("hooks", work / "check-hooks")  # warm-up, and the equal-work check
        for variant in variants[1:]:  # every other variant's warm-up writes the folder it is checked on
            run(variant, work / f"check-{variant}")
            problem = same_files(work / "check-hooks", work / f"check-{variant}")
            checks[variant] = problem or "same rows, same values"
            print(f"check hooks vs {variant}: {checks[variant]}", file=sys.stderr)
        rates: dict[str, list[float]] = {v: [] for v in variants}
        for round_ in range(options.rounds):
            # rotated order, round after round: drift and warm caches hit every variant alike
            order = variants[round_ % len(variants):] + variants[:round_ % len(variants)]
            for variant in order:
                out = work / f"{variant}-{round_}"
                rates[variant].append(run(variant, out))
                shutil.rmtree(out)
                print(f"round {round_} {variant}: {rates[variant][-1]:,.0f} tok/s", file=sys.stderr)
    finally:
        for peer in peers.values():
            if peer.process.poll() is None:
                peer.process.stdin.close()  # end of input: the worker exits
                peer.process.wait()
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)

    def ratio(a: str, b: str) -> float | None:
        """Median of the per-round ratios a/b (each round's pair ran under the same load)."""
        if a not in rates or b not in rates:
            return None
        return statistics.median(x / y for x, y in zip(rates[a], rates[b]))

    result = {"model": path.name, "tokens_per_round": len(texts) * options.max_length,
              "rounds": options.rounds, "threads": torch.get_num_threads(),
              "tokens_per_s": {v: statistics.median(r) for v, r in rates.items()},
              "checks": checks, "skipped": skipped,
              "peer_versions": {label: peer.versions for label, peer in peers.items()},
              "extract_over_hooks": ratio("extract", "hooks"),
              "extract_over_nnsight": ratio("extract", "nnsight"),
              "extract_over_transformerlens": ratio("extract", "TransformerLens"),
              "remote_over_extract": ratio("remote", "extract")}
    print("\n| variant | tokens/s (median) | vs hooks | check vs hooks |\n|---|---:|---:|---|")
    for variant, rate in result["tokens_per_s"].items():
        versus = "1.000x" if variant == "hooks" else f"{ratio(variant, 'hooks'):.3f}x"
        print(f"| {variant} | {rate:,.0f} | {versus} | {checks.get(variant, '(reference)')} |")
    for label, reason in skipped.items():
        print(f"| {label} | SKIPPED: {reason} | | |")
    print()
    for key, text, target in [("extract_over_hooks", "extract / hooks", " (target >= 0.95)"),
                              ("extract_over_nnsight", "extract / nnsight", ""),
                              ("extract_over_transformerlens", "extract / TransformerLens", ""),
                              ("remote_over_extract", "remote / local extract", " (target >= 0.8)")]:
        if result[key] is not None:
            print(f"{text}: {result[key]:.3f}x{target}")
    if len(skipped) == len(PEERS) and not PEERS_PYTHON.exists():
        print(f"nnsight, TransformerLens: SKIPPED: {PEERS_PYTHON} is missing; create it with "
              "`bash bench/setup_peers.sh`")
    for label, peer in peers.items():
        print(f"{label} worker: {', '.join(f'{k} {v}' for k, v in peer.versions.items())}")
    if options.json:
        Path(options.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
