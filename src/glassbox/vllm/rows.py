"""Which rows of each engine step belong to which invoke.

Offers:
    RowRouter(interleaver, own=False)
        .bind(request_ids)   the engine's ids of the trace's requests, in invoke order
        .begin_step(req_ids, starts, num_tokens)
                             before the model's forward: every consumer's rows in the step's token
                             slab; consumers whose request has no tokens in this step are marked
                             absent (not served: they wait for a step that has their request)
        .to_requests()       before the logits / samples: one row per request instead of per token
        .steps(consumer)     how many steps of its request a consumer has reached (``tracer.iter``)

vLLM has no batch dimension: a step's hidden states are one ``[tokens, hidden]`` slab holding every
scheduled request's tokens back to back (a prefill: its whole prompt; a decode step: one row), in
the model runner's batch order; request ``i`` of that order owns rows
``query_start_loc[i]:query_start_loc[i + 1]``. Logits and sampled tokens have one row per request, in
the same order. Requests join and leave between steps (continuous batching), so rows are set anew
at every step rather than once per trace as with Hugging Face models.

A consumer's request is the ``Rows(i, i + 1)`` the model's ``_batch`` gave its invoke (request
``i``); a consumer without rows (the body of a one-input trace, an empty invoke, a
``tracer.all()`` body) sees the whole slab, and with a single request that is exactly its own rows.
"""

from __future__ import annotations

from typing import Any

from ..batching import Rows

_WHOLE = -1  # a consumer that sees every row of the step


class RowRouter:
    """Per-step rows of each consumer of one trace (see the module docstring)."""

    def __init__(self, interleaver: Any) -> None:
        self.interleaver = interleaver
        self.request_ids: list[str] = []
        self._request_of: dict[int, int] = {}  # id(consumer) -> request index, or _WHOLE
        self._own: dict[int, bool] = {}  # id(consumer) -> hand it copies (co-tenants), from its Rows
        self._steps: dict[int, int] = {}
        self._per_request: list[tuple[Any, Rows | None]] = []  # (consumer, its row in logits/samples)
        self.num_reqs = 0

    def bind(self, request_ids: list[str]) -> None:
        self.request_ids = list(request_ids)

    def steps(self, consumer: Any) -> int:
        return self._steps.get(id(consumer), 0)

    def _request(self, consumer: Any) -> int:
        key = id(consumer)
        index = self._request_of.get(key)
        if index is None:
            rows = consumer.rows
            if rows is None:
                index = 0 if len(self.request_ids) == 1 else _WHOLE
                self._own[key] = False
            else:
                index = rows.start
                self._own[key] = rows.own
            self._request_of[key] = index
        return index

    def begin_step(self, req_ids: list[str], starts: Any, num_tokens: int) -> None:
        """``req_ids``: the step's requests in batch order; ``starts``: its ``query_start_loc``
        (``len(req_ids) + 1`` offsets into the slab); ``num_tokens``: the slab's length."""
        interleaver = self.interleaver
        interleaver.batch_size = num_tokens
        self.num_reqs = len(req_ids)
        position = {rid: i for i, rid in enumerate(req_ids)}
        ours = self.request_ids
        per_request = self._per_request = []
        for consumer in interleaver.consumers:
            if consumer.done:
                continue
            index = self._request(consumer)
            key = id(consumer)
            if index == _WHOLE:
                consumer.rows, consumer.absent = None, False
                per_request.append((consumer, None))
            else:
                at = position.get(ours[index]) if index < len(ours) else None
                if at is None:
                    consumer.absent = True
                    continue
                own = self._own[key]
                consumer.rows = Rows(int(starts[at]), int(starts[at + 1]), own=own)
                consumer.absent = False
                per_request.append((consumer, Rows(at, at + 1, own=own)))
            self._steps[key] = self._steps.get(key, 0) + 1

    def to_requests(self) -> None:
        """From the token slab to one row per request (logits, sampled tokens) for this step."""
        self.interleaver.batch_size = self.num_reqs
        for consumer, rows in self._per_request:
            consumer.rows = rows
