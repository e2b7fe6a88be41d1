"""Remote keeps the local meaning: the seed's workflows as written give the same values with
``remote=True`` as without, through a real embedded server (``glassbox serve`` on 127.0.0.1
holding the offline tiny GPT-2): gradients read after the block, caches keyed by layer,
sets and nested structures."""

from __future__ import annotations

import pytest
import torch

from glassbox import NotSavedError
from glassbox.cli import start_server
from glassbox.offline import tiny_gpt2_path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = tiny_gpt2_path()
    running = start_server({path.name: str(path)}, state_dir=str(tmp_path_factory.mktemp("meaning")),
                           args=["--torch-threads", str(torch.get_num_threads())])
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def model(gpt2):
    return gpt2


def seed_gradients(model, remote):
    """The seed's workflow 5, line for line (the tiny model's layer 1 for its layer 5; in
    transformers 5 a block's output is the hidden state itself, so no ``[0]``)."""
    with model.trace("The quick brown fox", remote=remote):
        hidden = model.transformer.h[1].output.save()
        hidden.retain_grad()
        logits = model.output
        target_token = model.tokenizer.encode(" jumps")[0]
        loss = -logits[0, -1, target_token]
        loss.backward()
    return hidden.grad


def test_the_seeds_gradient_workflow_gives_the_gradient_remotely(model, remote):
    local = seed_gradients(model, remote=False)
    model._module.zero_grad(set_to_none=True)
    far = seed_gradients(model, remote=True)
    assert far is not None, "a saved tensor's .grad must come back with it"
    assert torch.allclose(local, far, atol=1e-6) and local.norm() > 0


def test_a_grad_that_was_never_saved_is_not_a_silent_none(model, remote):
    with model.trace("The quick brown fox", remote=True):
        hidden = model.transformer.h[1].output
        hidden.retain_grad()
        model.output.logits[0, -1].sum().backward()
    with pytest.raises(NotSavedError):
        hidden.grad


def cache_and_patch(model, remote):
    """The seed's sweep: a cache keyed by layer, filled in one trace, read in the next (in a
    loop: a name the block set last time, unsaved, is not sent again)."""
    clean_cache = {}
    with model.trace("The Eiffel Tower is in", remote=remote):
        for layer in range(len(model.transformer.h)):
            clean_cache[layer] = model.transformer.h[layer].output.save()
    results = {}
    for layer in (0, 2):
        with model.trace("The Colosseum is in", remote=remote):
            current = model.transformer.h[layer].output
            current[:, -1, :] = clean_cache[layer][:, -1, :]
            results[(layer, -1)] = model.output.logits[0, -1].save()
    return clean_cache, results


def test_caches_keyed_by_layer_travel_both_ways(model, remote):
    local_cache, local_results = cache_and_patch(model, remote=False)
    far_cache, far_results = cache_and_patch(model, remote=True)
    assert list(far_cache) == list(local_cache) == list(range(len(model.transformer.h)))
    assert list(far_results) == [(0, -1), (2, -1)]
    for key in local_cache:
        assert torch.equal(local_cache[key], far_cache[key])
    for key in local_results:
        assert torch.equal(local_results[key], far_results[key])


def test_sets_and_nested_mixes_come_back(model, remote):
    with model.trace("Hello world", remote=True):
        nested = {"by_layer": {i: (i, [model.transformer.h[i].output.norm()]) for i in range(2)},
                  (0, "last"): frozenset({1, 2})}.save()
        shapes = {tuple(block.output.shape) for block in model.transformer.h[2:]}.save()
    assert isinstance(shapes, set) and len(shapes) == 1
    assert set(nested) == {"by_layer", (0, "last")} and nested[(0, "last")] == frozenset({1, 2})
    assert nested["by_layer"][1][0] == 1 and nested["by_layer"][1][1][0].ndim == 0
