"""The trace block run once per batch: here for ``remote=False``, on the server for ``remote=True``.

Offers:
    trace_batch(model, batch, plan, remote=False)
        -> {tensor name: tensor} (local), or the JobHandle of the submitted job (remote)

The block is ordinary glassbox trace code, so with ``remote=True`` glassbox ships its source and
the server runs it under the sandbox: the reductions (position selection, pooling, projection,
top-k, dtype cast) happen next to the model and only their results cross the network. Everything
the block reads is plain data (paths, index tensors, the projection, a dtype), which is what a
remote block may be sent. It stops the forward pass after the last module it reads, so the layers
above it and the language-model head never run.
"""

from __future__ import annotations

from typing import Any

import torch

from .batches import Batch
from .plan import Plan


def trace_batch(model: Any, batch: Batch, plan: Plan, remote: bool = False) -> Any:
    """Run one batch; the rows it keeps of each module, reduced as ``plan`` says."""
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    # No None values: a remote block is not sent names bound to None (the client takes them for
    # builtins), so "off" is spelled "" / {} / 0 / False here.
    paths, project, pool, topk = plan.paths, plan.project or {}, plan.pool or "", plan.topk or 0
    dtype = plan.dtype or False
    rows_b, rows_t, spans = batch.rows_b, batch.rows_t, batch.spans
    out: dict[str, Any] = {}  # filled by the block (sent to the server empty, returned filled)
    with model.trace(inputs, remote=remote, blocking=not remote) as tracer:
        for path in paths:
            module = model
            for part in path.split("."):
                module = module[part]
            h = module.output
            if isinstance(h, tuple):
                h = h[0]  # attention modules and older decoder layers return (hidden, ...)
            if h.ndim != 3:
                raise ValueError(path + " outputs a tensor of shape " + str(tuple(h.shape))
                                 + ", not [batch, positions, hidden]; pick another module")
            h = h[rows_b, rows_t]  # [rows, hidden]: a copy of the selected positions, never padding
            if pool == "mean":
                h = torch.stack([h[start:stop].mean(0) for start, stop in spans])
            elif pool == "max":
                h = torch.stack([h[start:stop].amax(0) for start, stop in spans])
            if project:
                h = h @ project[path].to(h.dtype)
            if topk:
                found = h.topk(topk, dim=-1)
                out[path + ":indices"] = found.indices.save()
                h = found.values
            if dtype:
                h = h.to(dtype)
            out[path] = h.save()
        h = found = None  # a remote job returns saved values by name too: only `out` should travel
        tracer.stop()
    return tracer.job if remote else out
