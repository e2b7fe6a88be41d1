"""Documents into padded batches, each with the rows it stores.

Offers:
    Batch                one forward pass: left-padded ``input_ids`` / ``attention_mask``, the
                         gather indices of the rows to keep, and each row's (document, position)
    batches(source, tokenizer, plan, pad_id, skip=0) -> iterator of Batch

A batch holds whole documents (tokenized, truncated to ``plan.max_length``) while
``documents x longest`` stays within ``plan.batch_tokens``: padded tokens count, because they
cost the same memory and time. Memory is bounded by one batch whatever the corpus size: texts are
read and tokenized a few dozen at a time. Documents with nothing to keep (empty, or no position
selected) are not run at all, but still count as done. The padding is on the left, as glassbox
pads any list of prompts, so a row's column is ``width - length + position``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .plan import Plan
from .sources import Source

_TOKENIZE_AT_ONCE = 64  # texts per tokenizer call: fast tokenizers batch well, memory stays small


@dataclass
class Batch:
    """One forward pass worth of documents ``[first, stop)``; ``input_ids`` may have no rows."""

    first: int
    stop: int
    input_ids: torch.Tensor            # [n, width], left-padded
    attention_mask: torch.Tensor       # [n, width]
    rows_b: torch.Tensor               # [rows] batch row of each selected position
    rows_t: torch.Tensor               # [rows] its column
    spans: list[list[int]]             # per run document: [start, stop) of its selected rows
    documents: torch.Tensor            # [stored rows] document number of each stored row
    positions: torch.Tensor            # [stored rows] its token position (-1: pooled over positions)
    tokens: int                        # real (unpadded) tokens run

    @property
    def empty(self) -> bool:
        return self.input_ids.shape[0] == 0


def batches(source: Source, tokenizer: Any, plan: Plan, pad_id: int, skip: int = 0) -> Iterator[Batch]:
    """The batches of ``source`` from document ``skip`` on."""
    pending: list[tuple[int, list[int], list[int]]] = []  # (document, ids, selected positions)
    width, first, seen = 0, skip, skip
    for number, ids in _tokenized(source, tokenizer, plan.max_length, skip):
        seen = number + 1
        kept = plan.select(ids, number)
        if not kept:
            continue  # nothing to store: not run, but [first, stop) of its batch still covers it
        if pending and (len(pending) + 1) * max(width, len(ids)) > plan.batch_tokens:
            yield _batch(pending, first, number, plan, pad_id)
            pending, width, first = [], 0, number
        pending.append((number, ids, kept))
        width = max(width, len(ids))
    if pending or seen > first:
        yield _batch(pending, first, seen, plan, pad_id)


def _tokenized(source: Source, tokenizer: Any, max_length: int, skip: int) -> Iterator[tuple[int, list[int]]]:
    number = skip
    texts = source.documents(skip)
    while True:
        chunk = list(itertools.islice(texts, _TOKENIZE_AT_ONCE))
        if not chunk:
            return
        encoded = tokenizer(chunk, truncation=True, max_length=max_length)["input_ids"]
        for ids in encoded:
            yield number, list(ids)
            number += 1


def _batch(pending: list[tuple[int, list[int], list[int]]], first: int, stop: int, plan: Plan,
           pad_id: int) -> Batch:
    width = max((len(ids) for _, ids, _ in pending), default=0)
    input_ids = torch.full((len(pending), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(pending), width), dtype=torch.long)
    rows_b, rows_t, spans, documents, positions = [], [], [], [], []
    tokens = 0
    for b, (number, ids, kept) in enumerate(pending):
        pad = width - len(ids)
        input_ids[b, pad:] = torch.tensor(ids, dtype=torch.long)
        attention_mask[b, pad:] = 1
        tokens += len(ids)
        spans.append([len(rows_b), len(rows_b) + len(kept)])
        rows_b.extend([b] * len(kept))
        rows_t.extend(pad + p for p in kept)
        if plan.pool is None:
            documents.extend([number] * len(kept))
            positions.extend(kept)
        else:
            documents.append(number)
            positions.append(-1)
    return Batch(first, stop, input_ids, attention_mask, torch.tensor(rows_b, dtype=torch.long),
                 torch.tensor(rows_t, dtype=torch.long), spans, torch.tensor(documents, dtype=torch.long),
                 torch.tensor(positions, dtype=torch.long), tokens)
