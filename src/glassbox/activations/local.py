"""The extraction loop on this machine, and how one batch's values become a shard.

Offers:
    run_local(model, plan, batches, writer, progress)   a trace per batch, a shard per trace
    store(writer, progress, batch, values)              one batch's reduced values -> one shard

Grad mode is off around each trace (the model's forward starts under it), so no autograd graph is
kept: memory is the batch's activations and nothing more.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .batches import Batch
from .block import trace_batch
from .plan import DOCUMENT, POSITION, Plan
from .progress import Progress
from .writer import ShardWriter


def run_local(model: Any, plan: Plan, batches: Iterable[Batch], writer: ShardWriter,
              progress: Progress) -> None:
    for batch in batches:
        values: dict[str, torch.Tensor] = {}
        if not batch.empty:
            with torch.no_grad():
                values = trace_batch(model, batch, plan)
        store(writer, progress, batch, values)


def store(writer: ShardWriter, progress: Progress, batch: Batch, values: dict[str, Any]) -> None:
    """Write ``values`` (the block's output for ``batch``) as the next shard."""
    rows = len(batch.documents)
    if rows == 0:
        writer.advance(batch.stop, batch.tokens)
    else:
        tensors = dict(values)
        for name, tensor in tensors.items():
            if not isinstance(tensor, torch.Tensor) or tensor.shape[0] != rows:
                shape = getattr(tensor, "shape", type(tensor).__name__)
                raise RuntimeError(f"{name}: the block gave {shape} for a batch of {rows} rows")
        tensors[DOCUMENT], tensors[POSITION] = batch.documents, batch.positions
        writer.write(tensors, batch.first, batch.stop, batch.tokens)
    progress.update(batch.stop - batch.first, batch.tokens, writer.rows)
