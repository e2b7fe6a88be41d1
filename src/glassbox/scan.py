"""``model.scan(...)``: a trace that computes shapes, not values.

Offers:
    ScanTracer   ``with model.scan("Hello"):`` a trace whose forward (and body) runs under
                 torch's FakeTensorMode: every value read is a fake tensor (shape, dtype,
                 device; no data), nothing is computed, and a LanguageModel that has not
                 loaded its weights yet (still on the meta device) does not load them.
                 Invokes, edits and ``tracer.result`` work as in a trace.
    to_meta(value, mode)  fake tensors of ``mode`` in ``value`` (lists, tuples, dicts,
                 model outputs) replaced by meta tensors of the same shape, dtype and strides

After the block the fake tensors the block left in the caller's variables (saved or not) and
``tracer.result`` become meta tensors: ``.shape`` / ``.dtype`` keep working, and anything that
needs a number fails at once ("cannot be called on meta tensors") instead of returning more
fakes far from where they came from (nnsight leaves fakes).

Normal traces pay nothing for this: the fake mode exists only inside a scan.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from .capture import capture_body, write_back
from .errors import TraceStateError
from .tracing import Tracer


class ScanTracer(Tracer):
    """``with model.scan(inputs) as tracer:`` — read shapes without weights or compute.

        with model.scan("Hello"):
            width = model.model.layers[0].output[0].shape[-1]
    """

    _method = "scan"

    def __init__(self, model: Any, args: tuple, kwargs: dict) -> None:
        super().__init__(model, args, kwargs)
        self._mode: Any = None
        self._frame: Any = None

    def __enter__(self) -> ScanTracer:
        # imported here: ShapeEnv pulls in sympy, which only a scan needs
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.experimental.symbolic_shapes import ShapeEnv

        # concrete shapes (not symbols); meta or real parameters join without being faked first
        mode = FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv(assume_static_by_default=True))
        # entered before the trace opens: a lazy model's _ensure_ready sees it and keeps its
        # weights unloaded, and the input is built as fake tensors
        mode.__enter__()
        try:
            super().__enter__()
        except BaseException:
            mode.__exit__(*sys.exc_info())
            raise
        self._mode, self._frame = mode, sys._getframe(1)
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        mode, frame = self._mode, self._frame
        self._mode = self._frame = None
        try:
            swallowed = super().__exit__(exc_type, exc, tb)
        finally:
            mode.__exit__(exc_type, exc, tb)
        if exc is None:
            self._result = to_meta(self._result, mode)
            _convert_frame(frame, mode)
        return swallowed

    def _task(self, interleaver: Any, args: tuple, kwargs: dict) -> Any:
        # meta parameters only combine with tensors on meta: move the input there (a model with
        # real weights keeps its input where it is; the fake mode fakes both)
        device = self.model.device
        if device is not None and device.type == "meta":
            args = tuple(_to_device(a, device) for a in args)
            kwargs = {k: _to_device(v, device) for k, v in kwargs.items()}
        return super()._task(interleaver, args, kwargs)

    def _run_now(self) -> Any:
        raise TraceStateError("model.scan(...) needs a with block: `with model.scan(input): ...`")


def _to_device(value: Any, device: torch.device) -> Any:
    return value.to(device) if isinstance(value, torch.Tensor) else value


def _convert_frame(frame: Any, mode: Any) -> None:
    """Replace, in ``frame``'s variables, the fakes of ``mode`` by meta tensors. Only the names
    the block assigns are looked at when its source is known (a module's namespace can be big)."""
    body = capture_body(frame, "scan")
    values = frame.f_locals
    names = body.writes if body is not None else list(values)
    changed = {}
    for name in names:
        if name in values:
            value = values[name]
            new = to_meta(value, mode)
            if new is not value:
                changed[name] = new
    write_back(frame, changed)


def to_meta(value: Any, mode: Any, depth: int = 4) -> Any:
    """``value`` with the fake tensors of ``mode`` replaced by meta tensors; lists and dicts
    (model outputs too) are changed in place, tuples rebuilt. ``depth`` bounds the search."""
    if isinstance(value, torch.Tensor):
        if getattr(value, "fake_mode", None) is not mode:
            return value
        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta")
    if depth <= 0:
        return value
    if isinstance(value, list):
        for i, item in enumerate(value):
            value[i] = to_meta(item, mode, depth - 1)
        return value
    if isinstance(value, dict):
        for key in list(value):
            new = to_meta(value[key], mode, depth - 1)
            if new is not value[key]:
                value[key] = new
        return value
    if isinstance(value, tuple):
        items = [to_meta(item, mode, depth - 1) for item in value]
        if all(new is old for new, old in zip(items, value)):
            return value
        maker = getattr(type(value), "_make", None)  # a namedtuple takes fields, not an iterable
        return maker(items) if maker is not None else type(value)(items)
    return value
