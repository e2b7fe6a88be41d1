"""tracer.cache(): outputs (and inputs) of chosen or all modules."""

from __future__ import annotations

import torch


def test_cache_all_modules(net, mlp, x):
    with net.trace(x) as tracer:
        cache = tracer.cache()
    assert torch.allclose(cache["model.0"].output, mlp[0](x))
    assert torch.allclose(cache.model[2].output, mlp[:3](x))
    assert torch.allclose(cache["model"].output, mlp(x))
    assert len(cache) == len(list(mlp.modules()))


def test_cache_selected_modules_with_inputs(net, mlp, x):
    with net.trace(x) as tracer:
        cache = tracer.cache(modules=[net[2], mlp[4]], include_inputs=True)
    assert set(cache) == {"model.2", "model.4"}
    assert torch.allclose(cache["model.2"].input, mlp[:2](x))
    assert torch.allclose(cache["model.4"].output, mlp[:5](x))


def test_cache_sees_edits(net, x):
    with net.trace(x) as tracer:
        cache = tracer.cache(modules=[net[1], net[2]])
        net[1].output[:] = 0
    assert torch.count_nonzero(cache["model.1"].output) == 0


def test_cache_holds_replaced_values(net, x):
    with net.trace(x) as tracer:
        cache = tracer.cache(modules=[net[2]])
        net[2].output = torch.full((2, 8), 7.0)
    assert torch.equal(cache["model.2"].output, torch.full((2, 8), 7.0))
