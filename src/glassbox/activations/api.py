"""``extract``: activations of many modules over many texts, into sharded safetensors on disk.

Offers:
    extract(model, texts, modules=, out=, ...) -> ActivationDataset

    extract
      ├─ Plan.build                 every argument checked before anything runs (plan.py), the
      │                             modules in the order the forward returns from them (order.py)
      ├─ Source                     list / .txt / .jsonl / datasets.Dataset (sources.py)
      ├─ ShardWriter                opens ``out``: new, or resumed from its index (writer.py)
      ├─ batches(..., skip=done)    tokenize, pack, pick rows (batches.py)
      ├─ run_local | run_remote     a trace per batch (block.py), a shard per trace (local.py, remote.py)
      └─ ActivationDataset(out)     reading it back (dataset.py)
"""

from __future__ import annotations

import os
import sys
from typing import Any

from .batches import batches
from .dataset import ActivationDataset
from .local import run_local
from .plan import Plan
from .progress import Progress
from .remote import run_remote
from .sources import Source
from .writer import ShardWriter


def extract(
    model: Any,
    texts: Any,
    *,
    modules: Any,
    out: str | os.PathLike,
    batch_tokens: int = 8192,
    max_length: int = 512,
    positions: Any = "all",
    dtype: Any = None,
    project: Any = None,
    pool: str | None = None,
    topk: int | None = None,
    remote: bool = False,
    text_field: str = "text",
    progress: bool | None = None,
    in_flight: int = 3,
) -> ActivationDataset:
    """Run ``model`` over ``texts`` and store the activations of ``modules`` in ``out``.

        ds = extract(model, ["some text", "more text"], modules=[model.model.layers[5]], out="acts/")
        acts, document, position = ds[0]

    texts: a list of str, a .txt file (a document per line), a .jsonl file (objects with a
        ``text_field``, or strings), a datasets.Dataset, or any iterable of str.
    modules: modules of ``model`` (or their dotted paths); each must output [batch, seq, hidden]
        (or a tuple starting with it). Any set works, blocks and their own submodules too: they
        are read in the order the forward returns from them (children before their parent;
        order.py), and a module the forward never calls is refused before anything runs.
    out: a folder: ``shard-NNNNN.safetensors`` files and ``index.json``. Running the same call
        again on a folder a run left unfinished (interrupted, killed) resumes it.
    batch_tokens: documents x longest document per forward pass (padding included): the memory bound.
    max_length: documents are truncated to this many tokens.
    positions: "all", "last", an int, a slice, a list of ints, or a callable ``ids -> positions``
        (it runs here, on the client, also for remote=True). Padding is never stored.
    dtype: stored dtype (e.g. "bfloat16"; None: the model's).
    project: a [hidden, k] tensor (or {module: tensor}): store ``h @ project`` instead of ``h``.
    pool: "mean" or "max" over each document's selected positions: one row per document.
    topk: keep the k largest values per row (after projection) and their indices.
    remote: run on the glassbox server at ``CONFIG.HOST``: one job per batch, ``in_flight`` at a
        time; the reductions above run there, so only their results cross the network.
    progress: a bar on stderr (documents, tokens/s, rows, ETA); None: only on a terminal.
    """
    if not hasattr(model, "tokenizer") or not hasattr(model, "_pad_id"):
        raise TypeError("extract() needs a glassbox.LanguageModel (it tokenizes the texts)")
    if model.tokenizer is None:
        raise TypeError("extract() needs a model with a tokenizer")
    if not isinstance(in_flight, int) or in_flight < 1:
        raise ValueError(f"in_flight must be a positive int, got {in_flight!r}")
    plan = Plan.build(model, modules=modules, positions=positions, max_length=max_length,
                      batch_tokens=batch_tokens, dtype=dtype, project=project, pool=pool, topk=topk,
                      text_field=text_field)
    source = Source(texts, text_field)
    writer = ShardWriter(out, plan.settings(model, source), {"batch_tokens": batch_tokens})
    if not writer.complete:
        shown = sys.stderr.isatty() if progress is None else bool(progress)
        bar = Progress(shown, total=source.count() if shown else None, done=writer.done)
        try:
            work = batches(source, model.tokenizer, plan, model._pad_id(), skip=writer.done)
            if remote:
                run_remote(model, plan, work, writer, bar, in_flight=in_flight)
            else:
                run_local(model, plan, work, writer, bar)
        finally:
            bar.close()
        writer.finish()
    return ActivationDataset(out)
