"""Generation traces: per-step interventions around Hugging Face ``generate``.

Offers:
    GenerateTracer   ``with model.generate(prompt, max_new_tokens=N) as tracer:``
                     ``tracer.iter[0:5]`` / ``tracer.iter[:]`` / ``tracer.iter[[0, 3]]``
                     (a plain ``for`` loop over steps), ``tracer.all()`` (a
                     block applied at every step), ``tracer.result`` (the
                     generated ids, after the block).

Every forward call of the model's root module is one step. Code before any
loop acts on step 0; inside ``for step in tracer.iter[...]`` each access
reaches that step's call. An open-ended ``iter[:]`` ends when generation
ends, and code after the loop still runs.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

from ..capture import SkipBody, capture_body, skip_body, write_back
from ..errors import OutOfOrderError, TraceStateError
from ..intercept import Consumer
from ..interleave import ENDED
from ..tracing import Tracer


class GenerateTracer(Tracer):
    """A trace around ``generate``.

        with model.generate("Hello", max_new_tokens=3) as tracer:
            for step in tracer.iter[:]:
                model.model.layers[5].output[:, -1] *= 1.5
        tokens = tracer.result
    """

    _method = "generate"

    def __init__(self, model: Any, args: tuple, kwargs: dict, *, remote: bool = False,
                 timeout: float | None = None, blocking: bool = True) -> None:
        original = dict(kwargs)
        input_kwargs = {k: kwargs.pop(k) for k in ("input_ids", "attention_mask") if k in kwargs}
        super().__init__(
            model, args, input_kwargs, call={"generate": kwargs}, remote=remote, timeout=timeout,
            blocking=blocking, remote_call=original,
        )
        self._per_step: list[_PerStep] = []

    @property
    def iter(self) -> _StepSelector:
        """``tracer.iter[a:b]``, ``tracer.iter[:]``, ``tracer.iter[[0, 3]]``."""
        return _StepSelector(self)

    def all(self) -> _AllSteps:
        """``with tracer.all():`` runs its block at every step (or ``for _ in tracer.all()``)."""
        return _AllSteps(self)

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        try:
            return super().__exit__(exc_type, exc, tb)
        finally:
            per_step, self._per_step = self._per_step, []
            if exc is None:
                for body in per_step:
                    body.publish()


class _StepSelector:
    def __init__(self, tracer: GenerateTracer) -> None:
        self.tracer = tracer

    def __getitem__(self, selection: int | slice | list[int]) -> Iterator[int]:
        if isinstance(selection, int):
            steps: Any = [selection]
        elif isinstance(selection, slice):
            if selection.step not in (None, 1) or (selection.start or 0) < 0:
                raise ValueError("tracer.iter takes a contiguous, non-negative range like [2:5] or [:]")
            steps = range(selection.start or 0, selection.stop if selection.stop is not None else sys.maxsize)
        else:
            steps = sorted(int(s) for s in selection)
        return _iterate(self.tracer, steps)


def _iterate(tracer: GenerateTracer, steps: Any) -> Iterator[int]:
    root = tracer.model
    for step in steps:
        interleaver = root.active
        if interleaver is None:
            return
        if not _reach_step(interleaver, root, step):
            return
        yield step


def _reach_step(interleaver: Any, root: Any, step: int) -> bool:
    """Advance to the start of generation step ``step``; False if generation ended."""
    site = interleaver.site(root)
    call = step + 1
    if site.n_in > call:
        raise OutOfOrderError(
            f"generation step {step} has already passed (the model is at step {site.n_in - 1}); "
            "iterate over steps in increasing order"
        )
    while site.n_in < call:
        if interleaver.request(root, "input", fresh=True, soft=True) is ENDED:
            return False
    return True


class _AllSteps:
    """``tracer.all()``: as a ``with`` block, its body runs at every step."""

    def __init__(self, tracer: GenerateTracer) -> None:
        self.tracer = tracer

    def __iter__(self) -> Iterator[int]:
        return self.tracer.iter[:]

    def __enter__(self) -> _AllSteps:
        frame = sys._getframe(1)
        body = capture_body(frame, "all")
        if body is None:
            raise TraceStateError(
                "`with tracer.all():` needs the source of its block (not available in python -c "
                "or exec'd strings); write `for step in tracer.iter[:]:` instead"
            )
        interleaver = self.tracer._active()
        if interleaver.state != "new":
            raise TraceStateError(
                "`with tracer.all():` must come before any module access in the generate block, "
                "so that it can apply from step 0"
            )
        per_step = _PerStep(body, frame, interleaver)
        self.tracer._per_step.append(per_step)
        interleaver.site(self.tracer.model).recorders.append(per_step.on_boundary)
        self._skipper = skip_body(frame, body)
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        self._skipper.disarm()
        return exc_type is SkipBody


class _PerStep:
    """A captured block started as a new consumer at each step's first boundary."""

    def __init__(self, body: Any, frame: Any, interleaver: Any) -> None:
        self.body = body
        self.frame = frame
        self.interleaver = interleaver
        self.ns = body.namespace(frame)
        self.step = 0

    def on_boundary(self, kind: str, value: Any) -> None:
        if kind != "input":
            return
        consumer = Consumer(f"tracer.all() at step {self.step}", None, self._run)
        self.step += 1
        self.interleaver.spawn(consumer)

    def _run(self, _start: Any = None) -> None:
        exec(self.body.code, self.ns)

    def publish(self) -> None:
        values = {n: self.ns[n] for n in self.body.writes if n in self.ns}
        write_back(self.frame, values)
        self.frame = None
        self.ns = {}
