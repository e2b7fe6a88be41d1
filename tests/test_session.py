"""model.session(): several traces, values flow between them."""

from __future__ import annotations

import torch


def test_values_flow_between_traces_in_a_session(net, mlp, x):
    with net.session():
        with net.trace(x[:1]):
            clean = net[2].output.save()
        with net.trace(x[1:]):
            net[2].output = clean
            patched = net.output.save()
    assert torch.allclose(patched, mlp(x[:1]), atol=1e-6)
