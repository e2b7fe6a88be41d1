"""Generation traces: per-step interventions around Hugging Face ``generate``.

Offers:
    GenerateTracer   ``with model.generate(prompt, max_new_tokens=N) as tracer:``
                     ``tracer.iter[0:5]`` / ``tracer.iter[:]`` / ``tracer.iter[[0, 3]]``
                     (a plain ``for`` loop over steps), ``tracer.all()`` (a
                     block applied at every step), ``tracer.result`` (the
                     generated ids: after the block, or inside it, where it
                     waits for generation to end: ``out = tracer.result.save()``).
    Generator, GeneratorEnvoy
                     the module behind ``model.generator`` and its envoy: ``.output`` is what
                     ``generate`` returned; ``.streamer.output`` each step's new
                     tokens (Hugging Face's streamer protocol, prompt left out).
    called_as_with(frame)  whether the call running in ``frame`` opens a ``with``
                     (``model.generate(...)`` without one just generates);
                     ``call_through(fn)`` marks a call wrapper it looks past.
    reach_step(interleaver, root, step, started=None)  advance a generate block to a step
                     (``GenerateTracer._reach_step``; VLLMTracer counts steps per request)

Every forward call of the model's root module is one step. Code before any
loop acts on step 0; inside ``for step in tracer.iter[...]`` each access
reaches that step's call. A loop that asks for a step generation never makes
(always so for an open-ended ``iter[:]``) warns "was never reached" and, as in
nnsight, ends the block there: the lines after it do not run (iteration.py).
"""

from __future__ import annotations

import dis
import warnings
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import torch

from ..envoy import Envoy
from ..errors import OutOfOrderError, TraceStateError, TraceStopped
from ..intercept import Consumer
from ..interleave import ENDED
from ..iteration import BLOCK_ENDS, AllCalls, EveryIteration, selected
from ..tracing import Tracer


class GenerateTracer(Tracer):
    """A trace around ``generate``.

        with model.generate("Hello", max_new_tokens=3) as tracer:
            for step in tracer.iter[:]:
                model.model.layers[5].output[:, -1] *= 1.5
        tokens = tracer.result
    """

    _method = "generate"

    def __init__(self, model: Any, args: tuple, kwargs: dict, *, remote: bool | str = False,
                 timeout: float | None = None, blocking: bool = True,
                 prompt_options: frozenset = frozenset(), shared: frozenset = frozenset()) -> None:
        """``prompt_options``: keywords that go with a prompt given here (a tokenizer's) rather than to
        ``generate``; those also in ``shared`` go to both (``max_length``, as nnsight's pipeline)."""
        original = dict(kwargs)
        keys = {"input_ids", "attention_mask"}
        if args or "input_ids" in kwargs:  # no prompt here: they stay generate's (invokes have their own)
            keys |= prompt_options
        input_kwargs = {k: kwargs[k] if k in shared else kwargs.pop(k) for k in list(kwargs) if k in keys}
        super().__init__(
            model, args, input_kwargs, call={"generate": kwargs}, remote=remote, timeout=timeout,
            blocking=blocking, remote_call=original,
        )

    @property
    def iter(self) -> _StepSelector:
        """``tracer.iter[a:b]``, ``tracer.iter[:]``, ``tracer.iter[[0, 3]]``."""
        return _StepSelector(self)

    def _reach_step(self, interleaver: Any, step: int) -> bool:
        """Advance to the start of generation step ``step``; False if generation ended. (An engine
        whose requests run different numbers of steps, glassbox.vllm, counts them per request.)"""
        return reach_step(interleaver, self.model, step)

    def all(self) -> _AllSteps:
        """``with tracer.all():`` runs its block at every step (or ``for _ in tracer.all()``)."""
        return _AllSteps(self)

    def _result_envoy(self) -> Any:
        # LanguageModel's generator; an engine without one (its root's output is the result) works too
        return self.model._generator or self.model


class Streamer(torch.nn.Module):
    """Hugging Face's streamer protocol (``put`` / ``end``) as a module: every batch of
    new tokens passes through ``forward``, so ``model.generator.streamer.output`` reads
    it. The prompt (the first ``put``) is left out: one call per generated token. A
    streamer the user passes to ``generate`` still gets every ``put`` and ``end``."""

    def __init__(self) -> None:
        super().__init__()
        self.user: Any = None
        self.prompt_seen = False

    def attach(self, user: Any) -> Streamer:
        """Start a generation; ``user`` is the caller's own streamer (or None)."""
        self.user, self.prompt_seen = user, False
        return self

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens

    def put(self, tokens: torch.Tensor) -> None:
        if self.prompt_seen:
            self(tokens)
        self.prompt_seen = True
        if self.user is not None:
            self.user.put(tokens)

    def end(self) -> None:
        user, self.user = self.user, None
        if user is not None:
            user.end()


class Generator(torch.nn.Module):
    """``model.generator``: called once with what ``generate`` returned (``.output``)."""

    def __init__(self) -> None:
        super().__init__()
        self.streamer = Streamer()

    def forward(self, generated: Any) -> Any:
        return generated


class GeneratorEnvoy(Envoy):
    """``model.generator``: its output is the end of the run, so once generation has
    finished (an open-ended ``for step in tracer.iter[:]`` runs to the end) reading it
    still gives what generate returned."""

    @property
    def output(self) -> Any:
        interleaver = self._interleaver("output")
        if interleaver.state == "done":
            return interleaver.result
        return Envoy.output.fget(self)

    @output.setter
    def output(self, value: Any) -> None:
        Envoy.output.fset(self, value)


_WITH_OPS = frozenset({"BEFORE_WITH", "SETUP_WITH"})
_with_calls: dict[tuple[Any, int], bool] = {}
_call_through: set[Any] = set()


def call_through(fn: Any) -> Any:
    """Mark ``fn`` as a plain call wrapper (the sandbox's ``_apply``, which runs ``f(*a, **k)``
    in restricted code): ``called_as_with`` looks past its frame to the user's line."""
    _call_through.add(fn.__code__)
    return fn


def called_as_with(frame: FrameType) -> bool:
    """Whether the call now running in ``frame`` is the expression of a ``with``
    statement: its next instruction enters the context. Read from the bytecode,
    so it needs no source (python -c, exec)."""
    while frame.f_code in _call_through and frame.f_back is not None:
        frame = frame.f_back
    key = (frame.f_code, frame.f_lasti)
    known = _with_calls.get(key)
    if known is None:
        # f_lasti may point into the CALL's inline cache entries: the next instruction is the
        # first that starts after it
        following = (i for i in dis.get_instructions(frame.f_code) if i.offset > frame.f_lasti)
        after = next(following, None)
        known = _with_calls[key] = after is not None and after.opname in _WITH_OPS
    return known


class _StepSelector:
    def __init__(self, tracer: GenerateTracer) -> None:
        self.tracer = tracer

    def __getitem__(self, selection: int | slice | list[int]) -> Iterator[int]:
        return _iterate(self.tracer, selected(selection)[0])


def _iterate(tracer: GenerateTracer, steps: Any) -> Iterator[int]:
    root = tracer.model
    done = 0
    for step in steps:
        interleaver = root.active
        if interleaver is None:
            return
        if not tracer._reach_step(interleaver, step):
            warnings.warn(  # as nnsight: the step never came, and the block ends here
                f"step {step} of tracer.iter was never reached: generation ended after {done} of "
                f"the selected steps ran (max_new_tokens, or an end-of-sequence token). "
                f"{BLOCK_ENDS}",
                stacklevel=2,
            )
            raise TraceStopped()
        done += 1
        yield step


def reach_step(interleaver: Any, root: Any, step: int, started: Callable[[], int] | None = None,
               whose: str = "the model") -> bool:
    """Advance to the start of generation step ``step``; False if generation ended. ``started()``
    counts the steps begun so far (default: the root's calls; glassbox.vllm counts one request's
    engine steps), ``whose`` names what it counts in the out-of-order error."""
    if started is None:
        site = interleaver.site(root)

        def started() -> int:
            return site.n_in

    call = step + 1
    if started() > call:
        raise OutOfOrderError(
            f"generation step {step} has already passed ({whose} is at step {started() - 1}); "
            "iterate over steps in increasing order"
        )
    while started() < call:
        if interleaver.request(root, "input", fresh=True, soft=True) is ENDED:
            return False
    return True


class _AllSteps(AllCalls):
    """``tracer.all()`` of a generation trace: its block starts as a new consumer at each step."""

    def _start(self, interleaver: Any, every: EveryIteration) -> None:
        if interleaver.state != "new":
            raise TraceStateError(
                "`with tracer.all():` must come before any module access in the generate block, "
                "so that it can apply from step 0"
            )
        step = 0

        def on_boundary(kind: str, value: Any) -> None:
            nonlocal step
            if kind == "input":  # the root module's input: a step begins
                interleaver.spawn(Consumer(f"tracer.all() at step {step}", None, every.run))
                step += 1

        interleaver.site(self.tracer.model).recorders.append(on_boundary)
