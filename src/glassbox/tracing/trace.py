"""Trace contexts: ``model.trace(...)``, ``tracer.invoke(...)``, ``save``.

Offers:
    Tracer    ``with model.trace(inputs) as tracer:``; the body runs inline, the
              model runs in a greenlet and meets it at module boundaries.
    Invoker   ``with tracer.invoke(inputs):``; bodies are deferred so that all
              invokes share ONE batched forward (each sees its own rows).
    Body / run_together(model, bodies, pad_to=0)
              the seam for running several INDEPENDENT bodies in one forward
              pass (a server's co-tenant batch): each in its own namespace, each
              seeing exactly what it would see alone (its rows, no padding its
              input did not have)
    remote_where(remote)   the extra arguments of a remote run for a ``remote=`` value
Saving and the stack of open traces are saving.py's (``save``, ``collect_saved``, sessions).

Call hierarchy::

    Tracer.__enter__  open Interleaver (Tensor.save, list.save & co are mounted at the first trace)
      body: envoy.output ...       -> Interleaver.request (inline consumer)
      body: with tracer.invoke(x)  -> Invoker: capture + skip body, queue input
    Tracer.__exit__   batch invoke inputs, Interleaver.finish() (runs model,
                      invoke bodies as greenlets), cleanup, write names back

If a deferred body's source cannot be found (``exec`` of a string that is not in
linecache; a ``python -c`` program has its source: capture.dash_c_program), each invoke
runs inline as its own forward instead: by the rule "batched equals unbatched" the values
are the same. With ``backend=`` (nnsight's), the whole block is captured on entering and
run by ``backend(tracer)`` on leaving (tracing/backend.py), the trace still open.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from types import CodeType
from typing import TYPE_CHECKING, Any

from ..cache import Cache
from ..capture import SkipBody, capture_body, run_in_frame, skip_body
from ..config import CONFIG
from ..deferred import Deferred
from ..errors import GlassboxError, TraceStateError, TraceStopped, at_user_line
from ..intercept import Consumer
from ..interleave import Interleaver
from ..iteration import AllCalls, CallSelector
from .backend import capture_block, raise_clean, run_backend
from .saving import ensure_mounted, pop, push, save

if TYPE_CHECKING:
    from ..models.base import NNsight

def remote_where(remote: bool | str) -> dict[str, Any]:
    """Extra arguments of ``model._run_remotely`` for a ``remote=`` value: ``"local"`` runs the
    block exactly as a server would, in this process."""
    if remote == "local":
        return {"local": True}
    if isinstance(remote, str):
        raise ValueError(f"remote= takes True (the server at CONFIG.HOST) or 'local', got {remote!r}")
    return {}


class Tracer:
    """Context of one traced execution.

        with model.trace(torch.randn(2, 4)) as tracer:
            h = model[0].output.save()
            model[1].output[:] = 0
    """

    _method = "trace"

    def __init__(
        self,
        model: NNsight,
        args: tuple,
        kwargs: dict,
        call: dict | None = None,
        *,
        remote: bool | str = False,
        timeout: float | None = None,
        blocking: bool = True,
        remote_call: dict | None = None,
        exact_rows: int | None = None,
        backend: Any = None,
    ) -> None:
        self.model = model
        # nnsight's trace(backend=...): the block is captured and run by backend(self) at its end
        self.backend, self.info, self._skipper = backend, None, None
        self._inputs = (args, kwargs) if (args or kwargs) else None
        # model.trace(output_hidden_states=True) with invokes: arguments of every invoke (nnsight)
        self._shared: dict = {}
        if not args and kwargs and not model._holds_input(kwargs):
            self._inputs, self._shared = None, dict(kwargs)
        self._call = call or {}
        self._remote = remote
        # what a remote run sends; copied only for one (two copies on every local trace's fixed cost)
        self._remote_args = (list(args), dict(kwargs) if remote_call is None else dict(remote_call)) \
            if remote else None
        self._timeout = timeout
        self._blocking = blocking
        self._remote_run: Any = None
        self.job: Any = None
        self._invokes: list[Deferred] = []
        self._interleaver: Interleaver | None = None
        self._fallback_inputs: list[tuple[tuple, dict]] = []
        # run_together: pad the invokes to at least this many positions and cut from each the
        # padding its input did not have. None: ordinary invokes (which see the batch's padding).
        self._exact_rows = exact_rows
        self._result: Any = None
        self._publishers: list[Any] = []  # run after a successful trace (tracer.all() bodies)

    # ---------------------------------------------------------------- context

    def __enter__(self) -> Tracer:
        root = self.model
        if self._remote:
            self._enter_remote(sys._getframe(1))
            return self
        if root.active is not None:
            raise TraceStateError(
                "this model is already being traced (a trace is open in this or another "
                "thread); finish that trace first, or wrap a second copy of the module"
            )
        if self.backend is not None:
            self.info, self._skipper = capture_block(sys._getframe(1), self._method)
        root._ensure_ready()
        ensure_mounted()
        interleaver = Interleaver(root, batch_size=0, narrow_min_ndim=root._narrow_min_ndim)
        for consumer in root._default_consumers(interleaver, self):  # edits: served first
            interleaver.add_consumer(consumer)
        if self._inputs is not None:
            # one input, the body as the only consumer: it sees the whole batch, no rows
            try:
                args, kwargs = root._single(root._prepare(*self._inputs))
            except BaseException:
                interleaver.cleanup()  # gives the runner back
                raise
            interleaver.task = self._task(interleaver, args, kwargs)
            interleaver.add_consumer(Consumer("trace body", None))
        self._interleaver = interleaver
        root.active = interleaver
        push(self)
        return self

    def _enter_remote(self, frame: Any) -> None:
        args, kwargs = self._remote_args  # type: ignore[misc]
        if args and kwargs.keys() & {"input_ids"}:
            raise TypeError("give the input once: positionally or as input_ids=")
        self._remote_run = self.model._run_remotely(
            self._method, capture_body(frame, self._method), frame, args, kwargs,
            timeout=self._timeout, blocking=self._blocking, **remote_where(self._remote),
        ).enter()

    def _exit_remote(self, exc_type: Any) -> bool:
        run, self._remote_run = self._remote_run, None
        swallowed = run.exit(exc_type)
        self.job, self.result = run.job, run.result
        return swallowed

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        if self._remote_run is not None:
            return self._exit_remote(exc_type)
        if self.info is not None:  # a backend runs the captured block now
            skipper, self._skipper = self._skipper, None
            ran, error = run_backend(self, skipper, exc_type)
            if not ran:
                return self._exit_local(exc)
            if not self._exit_local(error) and error is not None:
                raise_clean(error)
            return True
        return self._exit_local(exc)

    def execute(self, code: CodeType) -> None:
        """What a backend calls to run the captured block: in the caller's frame, the trace open."""
        run_in_frame(code, self.info.frame)  # type: ignore[union-attr]

    def _exit_local(self, exc: BaseException | None) -> bool:
        """End a local trace the block left with ``exc`` (None: it ended well); True if the trace
        swallows ``exc`` (tracer.stop()'s)."""
        root = self.model
        interleaver = self._interleaver
        assert interleaver is not None
        stopped = isinstance(exc, TraceStopped)  # tracer.stop(): the block ends there, the trace well
        if stopped:
            exc = None
        if isinstance(exc, GlassboxError):  # raised in the body: it ends at the user's line
            at_user_line(exc, CONFIG.APP.DEBUG)
        try:
            if exc is None:
                if self._invokes:
                    self._schedule_invokes(interleaver)
                elif self._inputs is None and interleaver.task is None:
                    if not self._fallback_inputs:
                        raise TraceStateError(
                            "model.trace() was given no input: pass it as "
                            "model.trace(input), or add `with tracer.invoke(input):` blocks"
                        )
                if interleaver.task is not None:
                    self.result = interleaver.finish()
        except GlassboxError as error:  # an invoke body's: its traceback ends at the user's line
            raise at_user_line(error, CONFIG.APP.DEBUG)  # noqa: B904 (the same error, re-raised)
        finally:
            interleaver.cleanup()
            root.active = None
            self._interleaver = None
            pop(self)
            invokes, self._invokes = self._invokes, []
            publishers, self._publishers = self._publishers, []
        if exc is None:
            for deferred in invokes:
                deferred.publish()
            for publish in publishers:
                publish()
        return stopped

    def _publish_later(self, publish: Any) -> None:
        """Call ``publish`` once the trace has ended well (a captured block writes its names back)."""
        self._publishers.append(publish)

    @property
    def result(self) -> Any:
        """What the model returned (``generate``: the generated ids). After the block, the
        value; inside it, the model runs to its end and the value is returned there, as in
        nnsight: ``out = tracer.result.save()``."""
        interleaver = self._interleaver
        if interleaver is None or self.model.active is not interleaver:
            return self._result
        if interleaver.state == "done":  # e.g. after an open-ended `for step in tracer.iter[:]`
            return interleaver.result
        return self._result_envoy().output

    @result.setter
    def result(self, value: Any) -> None:
        self._result = value

    def _result_envoy(self) -> Any:
        """The envoy whose output is the result inside the block (generate: model.generator)."""
        return self.model

    def _run_now(self) -> Any:
        """``model.trace(x, trace=False)`` / ``model.generate(x)`` without ``with``: run the
        model on the input now and return what it returned."""
        if self._remote:
            raise TraceStateError(
                "a remote run needs a with block: `with model.trace(input, remote=True):` (or "
                "model.generate(...)), saving what you need inside it"
            )
        with self:
            pass
        return self._result

    def _task(self, interleaver: Interleaver, args: tuple, kwargs: dict) -> Any:
        execute, call = self.model._execute, self._call

        def task() -> Any:
            return interleaver.run_task(lambda: execute(args, kwargs, **call))

        return task

    def _schedule_invokes(self, interleaver: Interleaver) -> None:
        root = self.model
        batched = [d for d in self._invokes if d.inputs is not None]
        if not batched:
            raise TraceStateError(
                "every tracer.invoke() in this trace is empty: give at least one "
                "invoke an input, e.g. tracer.invoke('some text')"
            )
        width = self._exact_rows
        args, kwargs, rows = root._batch([d.inputs for d in batched], width or 0)
        if width is not None:  # run_together: exact rows, each body with a copy of its own
            rows = [replace(r, own=True) for r in root._exact_rows([d.inputs for d in batched], rows, width)]
        for deferred, r in zip(batched, rows):
            deferred.consumer.rows = r
        interleaver.batch_size = rows[-1].stop
        for deferred in self._invokes:
            deferred.interleaver = interleaver
            interleaver.add_consumer(deferred.consumer)
        interleaver.task = self._task(interleaver, args, kwargs)

    # ---------------------------------------------------------------- API

    def invoke(self, *args: Any, **kwargs: Any) -> Invoker:
        """Add one input (or, with no arguments, a view of the whole batch)."""
        if self._inputs is not None:
            raise TraceStateError(
                "this trace already has an input (model.trace(input)); to batch several "
                "inputs, open the trace without one: `with model.trace() as tracer:` and "
                "add `with tracer.invoke(input):` blocks"
            )
        return Invoker(self, args, kwargs)

    @property
    def iter(self) -> CallSelector:
        """``for i in tracer.iter[0:3]:`` (or ``[:]``, ``[2]``, ``[[0, 2]]``): in iteration ``i``
        each module access means that module's call ``i + 1`` (modules called several times in one
        forward). See iteration.py for how a loop ends when the calls run out."""
        return CallSelector(self)

    def all(self) -> AllCalls:
        """``with tracer.all():`` runs its block at every call (``for _ in tracer.all()``: iter[:])."""
        return AllCalls(self)

    def barrier(self, participants: int) -> Any:
        """nnsight's ``tracer.barrier(n)``, for invokes that share a value at one module. Not
        needed here: at a shared boundary invokes are served in order, and a later invoke that
        reads a name an earlier one sets waits for it; the returned ``barrier()`` does nothing."""
        if participants < 1:
            raise ValueError("tracer.barrier(n) takes the number of invokes that meet, at least 1")
        return _no_barrier

    def stop(self) -> None:
        """Stop the model here: the rest of the forward pass does not run, nor the rest of the
        block (as in nnsight: the trace ends here, values saved so far are kept)."""
        self._active().stop()
        raise TraceStopped()

    def cache(self, modules: list | None = None, device: Any = "cpu", dtype: Any = None,
              detach: bool = True, include_output: bool = True, include_inputs: bool = False) -> Cache:
        """Record outputs (and inputs) of ``modules`` (envoys, modules or paths such as
        ``"model.layers.0"``; default: every module) at every call, converted to ``device`` /
        ``dtype`` and detached (see cache.py). The cache is saved: it comes back from remote runs."""
        root, interleaver = self.model, self._active()
        if interleaver.position is not None:  # as nnsight: a later cache would miss what already ran
            raise TraceStateError(
                f"tracer.cache() must be declared before reading or modifying a module (before "
                f"the trace reads or edits one): the model is "
                f"already at {interleaver._where()}, so the cache would miss what ran before it. "
                "Move `cache = tracer.cache(...)` to the top of the block."
            )
        envoys = root.modules() if modules is None else [root._envoy_of(m) for m in modules]
        cache = Cache.attach(interleaver, root, envoys, device=device, dtype=dtype, detach=detach,
                             include_output=include_output, include_inputs=include_inputs)
        return save(cache)

    def log(self, *values: Any) -> None:
        """``print`` (kept for nnsight compatibility; remote traces stream it)."""
        print(*values)

    def _active(self) -> Interleaver:
        interleaver = self.model.active
        if interleaver is None:
            raise TraceStateError("this tracer's trace has already ended")
        return interleaver


class Invoker:
    """``with tracer.invoke(input):`` — one batch entry of a trace.

        with model.trace() as tracer:
            with tracer.invoke(x1):
                a = model[0].output.save()
            with tracer.invoke(x2):
                model[0].output[:] = a
    """

    def __init__(self, tracer: Tracer, args: tuple, kwargs: dict) -> None:
        self.tracer = tracer
        self.args = args
        self.kwargs = kwargs
        self._skipping: Any = None
        self._inline: Interleaver | None = None

    def __enter__(self) -> Invoker:
        tracer = self.tracer
        frame = sys._getframe(1)
        body = capture_body(frame, "invoke") if not tracer._fallback_inputs else None
        root = tracer.model
        inputs = None
        if self.args or self.kwargs:  # the trace's keywords (model.trace(**kw) with no input) too
            inputs = root._prepare(self.args, {**tracer._shared, **self.kwargs})
        if body is not None:
            tracer._invokes.append(Deferred.invoke(body, frame, inputs, tracer._invokes))
            if not body.trivial:
                self._skipping = skip_body(frame, body)
            return self
        if tracer._invokes:
            raise TraceStateError(
                "cannot mix invokes whose source is available with ones whose is not"
            )
        self._enter_inline(inputs)
        return self

    def _enter_inline(self, inputs: Any) -> None:
        """No source: run this invoke now, as its own forward pass."""
        tracer, root = self.tracer, self.tracer.model
        if inputs is None:
            if not tracer._fallback_inputs:
                raise TraceStateError("an empty tracer.invoke() needs earlier invokes with inputs")
            items = list(tracer._fallback_inputs)
        else:
            tracer._fallback_inputs.append(inputs)
            items = [inputs]
        args, kwargs, rows = root._batch(items)
        interleaver = Interleaver(root, rows[-1].stop, root._narrow_min_ndim)
        interleaver.task = tracer._task(interleaver, args, kwargs)
        for consumer in root._default_consumers(interleaver, tracer):  # edits: served first
            interleaver.add_consumer(consumer)
        interleaver.add_consumer(Consumer("invoke", None))
        self._outer = root.active
        root.active = interleaver
        self._inline = interleaver

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        if self._skipping is not None:
            self._skipping.disarm()
            return exc_type is SkipBody
        if self._inline is None:  # a trivial deferred body: nothing ran, nothing to do
            return False
        interleaver = self._inline
        assert interleaver is not None
        try:
            if exc is None:
                self.tracer.result = interleaver.finish()
        finally:
            interleaver.cleanup()
            self.tracer.model.active = self._outer
            self._inline = None
        return False


@dataclass(frozen=True)
class Body:
    """One independent body for ``run_together``: compiled code, the globals it runs in (which
    afterwards hold every name it set), its input as ``model._prepare`` made it, a label."""

    code: CodeType
    namespace: dict[str, Any]
    inputs: Any
    label: str


def run_together(model: NNsight, bodies: list[Body], *, pad_to: int = 0) -> Any:
    """Run independent bodies as the invokes of ONE forward pass of ``model``; return the model's
    output. Unlike invokes, they share no names, and each sees exactly what it would see alone:
    its own rows, without the padding its input did not have (``batching.Rows.trim``), as a copy
    that shares no memory with the batch (``batching.Rows.own``). ``pad_to``
    pads the batch to at least that many positions (see ``Rows.trim`` for why a caller may need
    to choose the length). A body's exception propagates, as in any trace."""
    tracer = Tracer(model, (), {}, exact_rows=pad_to)
    with tracer:
        tracer._invokes.extend(Deferred(b.code, b.namespace, b.inputs, b.label) for b in bodies)
    return tracer.result


def _no_barrier() -> None:
    """What ``tracer.barrier(n)`` returns: invokes meet in order without it (see Tracer.barrier)."""
