"""``remote="local"``: a remote block serialised exactly as for a server and run in this
process by the server's own executor and sandbox, so remote code is tested without a server.

CONFIG.HOST points at a port nobody listens on: nothing here may use the network.
"""

from __future__ import annotations

import pytest
import torch

import glassbox
from glassbox import CONFIG, NotSavedError


@pytest.fixture(autouse=True)
def no_server(monkeypatch):
    monkeypatch.setattr(CONFIG, "HOST", "http://127.0.0.1:9")
    monkeypatch.setattr(CONFIG, "API_KEY", None)


def read_edit_save(model, remote):
    with model.trace("The Eiffel Tower is in", remote=remote):
        h1 = model.transformer.h[1].output.save()
        model.transformer.h[2].output[:, -1] *= 2.0
        logits = model.output.logits.save()
    return [h1, logits]


def invokes(model, remote):
    with model.trace(remote=remote) as tracer:
        with tracer.invoke("The cat sat on the"):
            cat = model.transformer.h[1].output.save()
        with tracer.invoke("The dog ran over the"):
            model.transformer.h[1].output[:] = cat
            dog = model.output.logits[:, -1].save()
    return [cat, dog]


def gradients(model, remote):
    with model.trace("The quick brown fox", remote=remote):
        hidden = model.transformer.h[1].output.save()
        hidden.retain_grad()
        loss = -model.output.logits[0, -1, model.tokenizer.encode(" jumps")[0]]
        loss.backward()
    return [hidden, hidden.grad]


def generate(model, remote):
    with model.generate("The capital of France is", max_new_tokens=3, do_sample=False,
                        remote=remote) as tracer:
        tokens = [].save()
        for _step in tracer.iter[:]:
            tokens.append(model.generator.streamer.output)
    return [tokens, tracer.result]  # the open loop ended the block; the result comes back


def session(model, remote):
    layers = {}
    with model.session(remote=remote):
        with model.trace("The Eiffel Tower is in"):
            for i in (3, 7):
                layers[i] = model.model.layers[i].output.save()
        with model.trace("The Colosseum is in"):
            model.model.layers[7].output[:, -1] = layers[7][:, -1]
            patched = model.output.logits[:, -1].save()
    return [layers, patched]


CASES = [("gpt2", read_edit_save), ("gpt2", invokes), ("gpt2", gradients), ("smol", generate),
         ("smol", session)]


@pytest.mark.parametrize(("fixture", "workflow"), CASES, ids=[w.__name__ for _, w in CASES])
def test_local_run_equals_plain_local(fixture, workflow, request):
    model = request.getfixturevalue(fixture)
    plain = workflow(model, remote=False)
    model._module.zero_grad(set_to_none=True)
    as_remote = workflow(model, remote="local")
    torch.testing.assert_close(as_remote, plain, rtol=0, atol=1e-6)


def test_the_sandbox_applies(gpt2):
    with pytest.raises(glassbox.GlassboxError, match="would modify a model weight"):
        with gpt2.trace("Hello", remote="local"):
            gpt2.transformer.h[0].attn.c_attn.weight.zero_()
    with pytest.raises(glassbox.GlassboxError, match="starts with"):
        with gpt2.trace("Hello", remote="local"):
            gpt2._module.cpu()
    with gpt2.trace("Hello"):
        assert gpt2.transformer.h[0].attn.c_attn.weight.abs().sum() > 0


def test_only_saved_values_come_back_and_errors_name_the_line(gpt2, capsys):
    with gpt2.trace("Hello", remote="local"):
        kept = gpt2.transformer.h[0].output.save()
        forgotten = gpt2.transformer.h[1].output
        print("shape", tuple(kept.shape))
    assert kept.shape[0] == 1 and "shape (1, 1, 64)" in capsys.readouterr().out
    with pytest.raises(NotSavedError):
        forgotten.shape
    with pytest.raises(ZeroDivisionError, match=r"1 / 0"):
        with gpt2.trace("Hello", remote="local"):
            1 / 0


def test_values_that_cannot_travel_fail_as_they_would_remotely(gpt2):
    handle = open(__file__)  # only its type matters: a file cannot travel
    try:
        with pytest.raises(glassbox.GlassboxError, match="cannot send"):
            with gpt2.trace("Hello", remote="local"):
                gpt2.transformer.h[0].output[:] = len(handle.name)
    finally:
        handle.close()


def test_local_runs_are_blocking(gpt2):
    with pytest.raises(ValueError, match="blocking=False"):
        with gpt2.trace("Hello", remote="local", blocking=False):
            pass
    with pytest.raises(ValueError, match="remote= takes True"):
        with gpt2.trace("Hello", remote="nearby"):
            pass
