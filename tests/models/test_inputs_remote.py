"""Tokenizer keywords and chat messages mean the same remotely: ``remote="local"`` (the server's
executor in this process) and a real embedded server (``glassbox serve`` on 127.0.0.1 holding the
tiny GPT-2) give the values of the local run, bit for bit."""

from __future__ import annotations

import pytest
import torch

from glassbox import CONFIG, LanguageModel
from glassbox.cli import start_server
from glassbox.offline import tiny_gpt2_path

TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = tiny_gpt2_path()
    running = start_server({path.name: str(path)}, state_dir=str(tmp_path_factory.mktemp("inputs")),
                           args=["--torch-threads", str(torch.get_num_threads())])
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def remote(server, monkeypatch):
    monkeypatch.setattr(CONFIG, "HOST", server.url)
    monkeypatch.setattr(CONFIG, "API_KEY", server.create_key("test_inputs_remote"))
    monkeypatch.setattr(CONFIG, "STATUS", False)
    return server


@pytest.fixture(scope="module")
def model():
    return LanguageModel(tiny_gpt2_path())


def options_everywhere(model, remote):
    with model.trace("The Eiffel Tower is in the city of", truncation=True, max_length=3, remote=remote):
        ids = model.inputs[1]["input_ids"].save()
        first = model.lm_head.output.save()
    with model.trace(remote=remote) as tracer:
        with tracer.invoke("Paris is", padding="max_length", max_length=6):
            padded = model.lm_head.output.save()
        with tracer.invoke(CHAT, chat_template=TEMPLATE):
            chat = model.inputs[1]["input_ids"].save()
    with model.trace(output_hidden_states=True, remote=remote) as tracer:  # keywords of every invoke
        with tracer.invoke("Paris is"):
            states = model.output.hidden_states[-1].save()
    with model.generate("The capital of France is", truncation=True, max_length=3, max_new_tokens=2,
                        do_sample=False, remote=remote) as tracer:
        generated = tracer.result.save()
    return [ids, first, padded, chat, generated, states]


def test_remote_local_equals_local(model):
    local = options_everywhere(model, remote=False)
    assert local[0].tolist() == [model.tokenizer("The Eiffel Tower is in the city of")["input_ids"][:3]]
    assert local[4].shape == (1, 5)
    torch.testing.assert_close(options_everywhere(model, remote="local"), local, rtol=0, atol=0)


def test_a_server_equals_local(model, remote):
    local = options_everywhere(model, remote=False)
    torch.testing.assert_close(options_everywhere(model, remote=True), local, rtol=0, atol=0)
