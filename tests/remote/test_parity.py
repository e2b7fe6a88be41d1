"""Local equals remote: the same blocks, run here and on a real server, give the same values.

The server is ``glassbox serve`` in a subprocess on 127.0.0.1 holding SmolLM2 and
the tiny GPT-2 under their folder names (what ``LanguageModel(path)`` asks for),
with as many torch threads as this process, so results match bit for bit; every
test runs against the local backend and against Ray with two replicas per model (the default
isolation, weights shared by the replicas).
"""

from __future__ import annotations

import pytest
import torch

import glassbox
from glassbox import CONFIG, NotSavedError
from glassbox.cli import start_server
from glassbox.offline import smollm2_path, tiny_gpt2_path


@pytest.fixture(scope="module", params=["local", "ray"])
def server(request, tmp_path_factory):
    """The same suite against both backends: one worker process, and Ray with two replicas of
    each model (a private Ray instance inside the server process, on 127.0.0.1) under the default
    isolation, the replicas of a model sharing one copy of its weights (--share-weights)."""
    models = {p.name: str(p) for p in (smollm2_path(), tiny_gpt2_path())}
    args = ["--torch-threads", str(torch.get_num_threads())]
    if request.param == "ray":
        pytest.importorskip("ray")
        weights = str(tmp_path_factory.mktemp("parity-weights"))
        args += ["--backend", "ray", "--share-weights", weights]
        for name in models:
            args += ["--replicas", f"{name}=2"]
    running = start_server(models, state_dir=str(tmp_path_factory.mktemp(f"parity-{request.param}")),
                           args=args)
    try:
        yield running
    finally:
        running.stop()


def _same(local, remote_value):
    if isinstance(local, torch.Tensor):
        assert isinstance(remote_value, torch.Tensor) and local.dtype == remote_value.dtype
        assert torch.equal(local, remote_value), (local - remote_value).abs().max()
    elif isinstance(local, (list, tuple)):
        assert len(local) == len(remote_value)
        for a, b in zip(local, remote_value):
            _same(a, b)
    elif isinstance(local, dict):
        assert local.keys() == remote_value.keys()
        for k in local:
            _same(local[k], remote_value[k])
    else:
        assert local == remote_value


# ---------------------------------------------------------------- workflows


def read_edit_save(model, remote):
    scale = 2.0
    with model.trace("The Eiffel Tower is in", remote=remote):
        h1 = model.transformer.h[1].output.save()
        model.transformer.h[2].output[:, -1] *= scale
        model.transformer.h[3].output = model.transformer.h[3].output * 0.5
        logits = model.output.logits.save()
    return [h1, logits]


def invokes_share_values(model, remote):
    with model.trace(remote=remote) as tracer:
        with tracer.invoke("The cat sat on the"):
            cat = model.transformer.h[1].output.save()
        with tracer.invoke("The dog ran over the"):
            model.transformer.h[1].output[:] = cat
            dog = model.output.logits[:, -1].save()
        with tracer.invoke():
            everything = model.transformer.h[0].output.save()
    return [cat, dog, everything]


def generate_steps(model, remote):
    with model.generate("The capital of France is", max_new_tokens=4, do_sample=False,
                        remote=remote) as tracer:
        states = []
        for _step in tracer.iter[:]:
            states.append(model.model.layers[3].output[:, -1].save())
            model.model.layers[8].output[:, -1] *= 1.5
    return [states, tracer.result]


def session_flow(model, remote):
    with model.session(remote=remote):
        with model.trace("The Eiffel Tower is in"):
            clean = model.model.layers[24].output.save()
        with model.trace("The Colosseum is in"):
            model.model.layers[24].output[:, -1, :] = clean[:, -1, :]
            patched = model.output.logits[:, -1].save()
    return [clean, patched]


def gradients(model, remote):
    with model.trace("The quick brown fox", remote=remote):
        hidden = model.transformer.h[1].output
        hidden.retain_grad()
        later = model.transformer.h[2].output
        loss = model.output.logits[0, -1].sum()
        with loss.backward():
            later_grad = later.grad.save()
        hidden_grad = hidden.grad.save()
    return [later_grad, hidden_grad]


def seed_analysis(model, remote):
    with model.trace("The capital of France is", remote=remote):
        layer_outputs = [layer.output.save() for layer in model.model.layers]
        logits = model.output.save()
    return [layer_outputs, logits.logits]


def variables_that_are_none(model, remote):
    """A variable bound to None reaches the block (it was once mistaken for an unsent builtin)."""
    scale = None
    with model.trace("The Eiffel Tower is in", remote=remote):
        factor = 1.0 if scale is None else scale
        h = (model.transformer.h[1].output * factor).save()
    return [h]


WORKFLOWS = [
    ("gpt2", read_edit_save), ("gpt2", variables_that_are_none), ("gpt2", invokes_share_values),
    ("gpt2", gradients),
    ("smol", generate_steps), ("smol", session_flow), ("smol", seed_analysis),
]


@pytest.mark.parametrize(("fixture", "workflow"), WORKFLOWS, ids=[w.__name__ for _, w in WORKFLOWS])
def test_local_equals_remote(fixture, workflow, request, remote):
    model = request.getfixturevalue(fixture)
    local = workflow(model, remote=False)
    model._module.zero_grad(set_to_none=True)
    _same(local, workflow(model, remote=True))


# ---------------------------------------------------------------- remote behaviour


def test_print_inside_the_block_shows_on_the_client(gpt2, remote, capsys):
    with gpt2.trace("Hello", remote=True):
        h = gpt2.transformer.h[0].output
        print("hidden shape", tuple(h.shape))
    assert "hidden shape (1, 1, 64)" in capsys.readouterr().out


def test_unsaved_values_explain_themselves(gpt2, remote):
    with gpt2.trace("Hello", remote=True):
        kept = gpt2.transformer.h[0].output.save()
        forgotten = gpt2.transformer.h[1].output
    assert kept.shape == (1, 1, 64)
    with pytest.raises(NotSavedError, match=r"call \.save\(\)"):
        forgotten.shape


def test_errors_carry_the_users_line(gpt2, remote):
    with pytest.raises(ZeroDivisionError, match="line") as info:
        with gpt2.trace("Hello", remote=True):
            gpt2.transformer.h[0].output.save()
            1 / 0
    assert "1 / 0" in str(info.value)


def test_server_refuses_what_the_sandbox_forbids_and_keeps_serving(gpt2, remote):
    with pytest.raises(glassbox.GlassboxError, match="would modify a model weight"):
        with gpt2.trace("Hello", remote=True):
            gpt2.transformer.h[0].attn.c_attn.weight.zero_()
    with gpt2.trace("Hello", remote=True):
        after = gpt2.output.logits.save()
    with gpt2.trace("Hello"):
        local = gpt2.output.logits.save()
    assert torch.equal(after, local)


def test_non_blocking_job_handle(gpt2, remote):
    with gpt2.trace("Hello world", remote=True, blocking=False) as tracer:
        h = gpt2.transformer.h[1].output.save()  # noqa: F841 - set on the server, fetched below
    job = tracer.job
    values = glassbox.JobHandle(job.id).result()  # as a new process would, from the id alone
    with gpt2.trace("Hello world"):
        local = gpt2.transformer.h[1].output.save()
    assert torch.equal(values["h"], local)
    assert job.status()["status"] == "COMPLETED"


def test_status_lines_show_progress_and_can_be_turned_off(gpt2, remote, capsys, monkeypatch):
    monkeypatch.setattr(CONFIG, "STATUS", True)
    with gpt2.trace("Hello", remote=True):
        gpt2.transformer.h[0].output.save()
    shown = capsys.readouterr().err
    assert "[glassbox] job" in shown and "COMPLETED" in shown
    monkeypatch.setattr(CONFIG, "STATUS", False)
    with gpt2.trace("Hello", remote=True):
        gpt2.transformer.h[0].output.save()
    assert "[glassbox] job" not in capsys.readouterr().err
