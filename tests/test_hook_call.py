"""envoy(x, hook=True): a module attached to the model and called by the trace's code is watched
like the model's own calls (other bodies read and edit its insides); a plain call is not."""

from __future__ import annotations

import pytest
import torch

import glassbox
from glassbox.errors import TraceStateError


class SAE(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = torch.nn.Linear(6, 12)
        self.decoder = torch.nn.Linear(12, 6)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.decoder(torch.relu(self.encoder(h)))


@pytest.fixture
def inp() -> torch.Tensor:
    torch.manual_seed(4)
    return torch.randn(2, 6)


def test_hook_true_call_is_watched_by_other_bodies(rec, inp):
    torch.manual_seed(6)
    rec.sae = SAE()  # attached to the model: an envoy and a real submodule
    assert isinstance(rec.sae, glassbox.Envoy) and rec._module.sae is rec.sae._module
    sae = rec._module.sae
    with torch.no_grad(), rec.trace() as tracer:
        with tracer.invoke(inp):
            h = rec.embed.output
            rec.embed.output = rec.sae(h, hook=True)
        with tracer.invoke():
            latents = rec.sae.encoder.output.save()
            out = rec.output.save()
        cache = tracer.cache(modules=[rec.sae.decoder])
    with torch.no_grad():
        h = rec._module.embed(inp)
        want_latents = sae.encoder(h)
        replaced = sae(h)
        for _ in range(3):
            replaced = replaced + rec._module.block(replaced)
        want_out = rec._module.head(replaced)
    assert torch.equal(latents, want_latents)
    assert torch.equal(cache["model.sae.decoder"].output, sae(h))
    assert torch.equal(out, want_out)


def test_ad_hoc_call_is_not_seen_and_hook_needs_a_value(rec, inp):
    rec.sae = SAE()
    with torch.no_grad(), rec.trace(inp) as tracer:
        cache = tracer.cache(modules=[rec.sae.encoder])
        h = rec.embed.output
        rec.sae(h)  # ad hoc: the trace does not see it
    assert cache["model.sae.encoder"].outputs == []
    with pytest.raises(TraceStateError, match="hook=True"):
        with rec.trace(inp):
            rec.sae(inp, hook=True)
