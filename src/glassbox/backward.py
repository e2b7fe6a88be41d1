"""Gradients inside a trace: ``with loss.backward():`` and ``.grad`` on activations.

Offers:
    patched_backward      ``Tensor.backward`` (mounted at the first trace): inside a trace,
                          used as a context manager it returns a BackwardTracer; called as
                          a plain statement, or outside a trace, it is torch's own backward.
    BackwardTracer        runs the backward pass in a greenlet (a thread on CUDA); inside its block
                          ``h.grad`` waits for the gradient of activation ``h``
                          and ``h.grad = g`` replaces it for the rest of the pass.

Gradients arrive in reverse order of the forward pass, so read them that way
(later layers first); asking for one the pass has already gone by raises
OutOfOrderError at that line.
"""

from __future__ import annotations

import dis
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

import greenlet
import torch

from .errors import OutOfOrderError, TraceStateError
from .patches import ClassPatch

_original_backward = torch.Tensor.backward
_grad_descriptor = torch._C.TensorBase.grad
_WITH_OPS = frozenset({"BEFORE_WITH", "SETUP_WITH", "LOAD_SPECIAL"})
_with_cache: dict[tuple[Any, int], bool] = {}
_state = threading.local()
_DONE = object()


class _Aborted(Exception):
    """Ends a threaded backward pass whose block was left early."""


def _followed_by_with(frame: FrameType) -> bool:
    """Is the call being made in ``frame`` the context expression of a ``with``?"""
    key = (frame.f_code, frame.f_lasti)
    answer = _with_cache.get(key)
    if answer is None:
        answer = False
        for instruction in dis.get_instructions(frame.f_code):
            if instruction.offset > frame.f_lasti:
                answer = instruction.opname in _WITH_OPS
                break
        _with_cache[key] = answer
    return answer


# The innermost open trace, if any: tracing/saving.py (which imports this module, so this one must not
# import it back) hands over its current_tracer through use_tracer_finder.
def _no_tracer() -> Any:
    return None


find_tracer: Callable[[], Any] = _no_tracer


def use_tracer_finder(finder: Callable[[], Any]) -> None:
    """Tell ``patched_backward`` how to find the innermost open trace (tracing.current_tracer)."""
    global find_tracer
    find_tracer = finder


def patched_backward(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    import sys

    tracer = find_tracer()
    if tracer is None:  # mounted for good (tracing.saving.ensure_mounted): outside a trace, torch's own
        return _original_backward(self, *args, **kwargs)
    refusal = getattr(type(tracer.model), "_no_gradients", None)
    if refusal:  # a model whose engine keeps no autograd graph (glassbox.VLLM) says why, and what instead
        raise TraceStateError(refusal)
    if _followed_by_with(sys._getframe(1)):
        return BackwardTracer(self, args, kwargs)
    return _original_backward(self, *args, **kwargs)


def _grad_get(tensor: torch.Tensor) -> Any:
    tracer = getattr(_state, "active", None)
    if tracer is not None and greenlet.getcurrent() is tracer.user:
        return tracer.read(tensor)
    return _grad_descriptor.__get__(tensor)


def _grad_set(tensor: torch.Tensor, value: Any) -> None:
    tracer = getattr(_state, "active", None)
    if tracer is not None and greenlet.getcurrent() is tracer.user:
        tracer.write(tensor, value)
        return
    _grad_descriptor.__set__(tensor, value)


def _grad_del(tensor: torch.Tensor) -> None:
    _grad_descriptor.__delete__(tensor)


_grad_patch = ClassPatch(torch.Tensor, "grad", property(_grad_get, _grad_set, _grad_del))


class BackwardTracer:
    """``with loss.backward():`` — read and replace gradients as they flow.

        with model.trace(x):
            h = model[0].output
            loss = model.output.sum()
            with loss.backward():
                g = h.grad.save()
    """

    always_threaded = False  # the tests set it to run the CUDA way on the CPU

    def __init__(self, loss: torch.Tensor, args: tuple, kwargs: dict) -> None:
        self.loss = loss
        self.args = args
        self.kwargs = kwargs
        self.user: Any = None
        self.glet: greenlet.greenlet | None = None
        self.waiting: torch.Tensor | None = None
        self.at: torch.Tensor | None = None
        self.current: Any = None
        self.replaced = False
        self.handles: list[Any] = []
        self.hooked: set[int] = set()  # ids of tensors that already carry our hook
        self.error: BaseException | None = None
        self.finished = False
        # On CUDA (any device but the CPU) autograd calls hooks on its own device threads, from
        # which no greenlet can switch: there the backward pass runs in a thread of ours and
        # hands control back and forth through a condition instead (``_resume_threaded``).
        self.threaded = self.always_threaded or loss.device.type != "cpu"
        self.cond = threading.Condition()
        self.turn = "user"
        self.thread: threading.Thread | None = None
        self.aborting = False

    def __enter__(self) -> BackwardTracer:
        if getattr(_state, "active", None) is not None:
            raise TraceStateError("backward contexts cannot be nested")
        self.user = greenlet.getcurrent()
        _grad_patch.acquire()
        _state.active = self
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        try:
            if exc is None:
                self.waiting = None
                self._resume()
                if self.error is not None:
                    raise self.error
        finally:
            self._close()
        return False

    def _close(self) -> None:
        _state.active = None
        _grad_patch.release()
        thread = self.thread
        if thread is not None and thread.is_alive():
            with self.cond:  # stop the backward pass at the hook it waits in
                self.aborting, self.turn = True, "backward"
                self.cond.notify_all()
            thread.join()
        self.thread = None
        glet = self.glet
        if glet is not None and not glet.dead:
            glet.parent = greenlet.getcurrent()
            try:
                glet.throw(greenlet.GreenletExit())
            except greenlet.GreenletExit:
                pass
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.glet = None
        self.current = self.at = self.waiting = None
        self.loss = None  # type: ignore[assignment]

    # ------------------------------------------------------------ backward side

    def _run(self) -> Any:
        try:
            _original_backward(self.loss, *self.args, **self.kwargs)
        except BaseException as exc:
            self.error = exc
        self.finished = True
        return _DONE

    def _hook_for(self, tensor: torch.Tensor) -> Any:
        def hook(grad: torch.Tensor) -> Any:
            if self.waiting is not tensor:
                return None
            self.waiting = None
            self.at, self.current, self.replaced = tensor, grad, False
            if self.threaded:
                self._hand_to_user()
            else:
                self.user.switch(grad)
            self.at = None
            value, self.current = self.current, None
            return value if self.replaced else None

        return hook

    # ------------------------------------------------------------ user side

    def _hand_to_user(self) -> None:
        """In the backward thread, at a hook: let the user's block run until it resumes us."""
        with self.cond:
            self.turn = "user"
            self.cond.notify_all()
            while self.turn != "backward":
                self.cond.wait()
        if self.aborting:
            raise _Aborted()

    def _run_threaded(self) -> None:
        self._run()
        with self.cond:
            self.turn = "user"
            self.cond.notify_all()

    def _resume_threaded(self) -> Any:
        with self.cond:
            self.turn = "backward"
            if self.thread is None:
                self.thread = threading.Thread(target=self._run_threaded, name="glassbox-backward",
                                               daemon=True)
                self.thread.start()
            self.cond.notify_all()
            while self.turn != "user":
                self.cond.wait()
        return _DONE if self.finished else self.current

    def _resume(self) -> Any:
        if self.finished:
            return _DONE
        if self.threaded:
            return self._resume_threaded()
        if self.glet is None:
            self.glet = greenlet.greenlet(self._run, parent=self.user)
        return self.glet.switch()

    def read(self, tensor: torch.Tensor) -> Any:
        if self.at is tensor:
            return self.current
        if not tensor.requires_grad:
            raise TraceStateError(
                "this tensor does not require grad, so it has no gradient; take it from a "
                "module output computed with grad enabled"
            )
        if tensor.is_leaf and tensor.grad_fn is None and id(tensor) not in self.hooked and self.finished:
            return _grad_descriptor.__get__(tensor)
        if id(tensor) not in self.hooked:
            self.hooked.add(id(tensor))
            self.handles.append(tensor.register_hook(self._hook_for(tensor)))
        self.waiting = tensor
        message = self._resume()
        if message is _DONE:
            self.waiting = None
            if self.error is not None:
                error, self.error = self.error, None
                raise error
            raise OutOfOrderError(
                "the gradient of this tensor was requested after the backward pass had "
                "passed it (or it does not reach the loss). Gradients arrive in reverse "
                "order of the forward pass: read later layers' .grad first."
            )
        return message

    def write(self, tensor: torch.Tensor, value: Any) -> None:
        if self.at is not tensor:
            self.read(tensor)
        self.current, self.replaced = value, True
