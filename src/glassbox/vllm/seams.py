"""The three places in a vLLM engine step where glassbox joins in, for the length of one trace.

Offers:
    Passthrough          an identity module: ``model.logits`` and ``model.samples`` are envoys over
                         two of these, called with the step's logits and sampled token ids, so that
                         reading, saving, editing and replacing them is ordinary module access
    installed(engine, router, logits, samples)
                         a context manager: while open, each engine step
                           1. before the model's forward   routes the slab's rows (RowRouter.begin_step)
                           2. after ``compute_logits``     routes one row per request, calls ``logits``
                           3. after the sampler            calls ``samples`` with the sampled token ids
                         and afterwards nothing of it is left on the runner or the model

They are instance attributes shadowing the runner's ``_model_forward`` and ``_sample`` and the
model's ``compute_logits``, not torch hooks: removing them restores the objects exactly, and the
forward itself stays hook-free (torch's fast path) except where a trace body asks for a module.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from .rows import RowRouter

_MISSING = object()


class Passthrough(torch.nn.Module):
    """Returns its input: a module boundary where there is none in vLLM (logits, sampled tokens)."""

    def forward(self, value: Any) -> Any:
        return value


@contextmanager
def installed(engine: Any, router: RowRouter, logits: Passthrough, samples: Passthrough) -> Iterator[None]:
    runner, model = engine.runner, engine.model
    model_forward, sample, compute_logits = runner._model_forward, runner._sample, model.compute_logits

    def routed_forward(*args: Any, **kwargs: Any) -> Any:
        batch = runner.input_batch
        count = batch.num_reqs
        ids = kwargs.get("input_ids")
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        router.begin_step(batch.req_ids[:count], runner.query_start_loc.np[: count + 1], int(ids.shape[0]))
        return model_forward(*args, **kwargs)

    def routed_logits(hidden: torch.Tensor) -> Any:
        out = compute_logits(hidden)
        router.to_requests()
        return logits(out)

    def routed_sample(*args: Any, **kwargs: Any) -> Any:
        out = sample(*args, **kwargs)
        out.sampled_token_ids = samples(out.sampled_token_ids)
        return out

    places = ((runner, "_model_forward", routed_forward), (runner, "_sample", routed_sample),
              (model, "compute_logits", routed_logits))
    before = [owner.__dict__.get(name, _MISSING) for owner, name, _ in places]
    for owner, name, wrapper in places:
        owner.__dict__[name] = wrapper
    try:
        yield
    finally:
        for (owner, name, _), value in zip(places, before):
            if value is _MISSING:
                owner.__dict__.pop(name, None)
            else:
                owner.__dict__[name] = value
