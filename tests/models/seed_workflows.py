"""The seed's workflows, checked on any traced model against its plain module (no glassbox).

Offers:
    Case          a model, the plain module it wraps, a dotted module path, an input in the
                  trace's form and in the plain module's form, a second input, the padding side
    WORKFLOWS     read, edit, save + invokes, gradient: each ``check(case)`` compares glassbox
                  with the same thing done on the plain module through forward hooks
    first(value)  a module's hidden state (the first element of a tuple output)
    main(output)  a model output's first field (logits, last_hidden_state, ...)
    tiny_image(seed, size)  a random PIL image
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


def first(value: Any) -> torch.Tensor:
    return value[0] if isinstance(value, tuple) else value


def main(output: Any) -> torch.Tensor:
    return output.to_tuple()[0] if hasattr(output, "to_tuple") else output


@dataclass
class Case:
    model: Any                   # the glassbox model
    module: torch.nn.Module      # the plain module it wraps
    path: str                    # a module whose output is a hidden state
    inputs: tuple                # (args, kwargs) as model.trace takes them
    plain: dict                  # the same input as the plain module's forward takes it
    other: tuple                 # a second input (another length where text is involved)
    side: str = "left"           # where a shorter input's padding goes in a batch
    hidden_states: Any = None    # plain output (output_hidden_states=True) -> the same hidden state
    output: Callable[[Any], torch.Tensor] = main  # the part of the model's output compared, per row


def tiny_image(seed: int, size: int = 40) -> Any:
    import numpy as np
    from PIL import Image

    pixels = np.random.RandomState(seed).randint(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def plain_run(case: Case, edit: Any = None, grad: bool = False) -> tuple[Any, torch.Tensor]:
    """The plain module's output and the hidden state at ``case.path`` (hooked; edited by ``edit``)."""
    captured = {}

    def hook(module: Any, inputs: Any, output: Any) -> None:
        hidden = first(output)
        if edit is not None:
            edit(hidden)
        if grad:
            hidden.retain_grad()
        captured["hidden"] = hidden

    handle = case.module.get_submodule(case.path).register_forward_hook(hook)
    try:
        output = case.module(**case.plain)
    finally:
        handle.remove()
    return output, captured["hidden"]


def check_read(case: Case) -> None:
    args, kwargs = case.inputs
    with case.model.trace(*args, **kwargs):
        hidden = first(case.model.get(case.path).output).save()
        output = case.output(case.model.output).save()
    plain_output, plain_hidden = plain_run(case)
    torch.testing.assert_close(hidden, plain_hidden)
    torch.testing.assert_close(output, case.output(plain_output))
    if case.hidden_states is not None:
        reference = case.hidden_states(case.module(**case.plain, output_hidden_states=True))
        torch.testing.assert_close(hidden, reference)


def _edit(hidden: torch.Tensor) -> None:
    hidden[..., 0] += 1.0  # one feature: scaling all of them would vanish in a LayerNorm


def check_edit(case: Case) -> None:
    args, kwargs = case.inputs
    with case.model.trace(*args, **kwargs):
        _edit(first(case.model.get(case.path).output))
        edited = case.output(case.model.output).save()
    plain_edited, _ = plain_run(case, edit=_edit)
    plain_clean, _ = plain_run(case)
    torch.testing.assert_close(edited, case.output(plain_edited))
    assert not torch.allclose(edited, case.output(plain_clean))


def _unpadded(batched: torch.Tensor, alone: torch.Tensor, side: str) -> torch.Tensor:
    """The positions of ``batched`` that ``alone`` has (the batch may have padding on ``side``)."""
    if batched.ndim < 2 or batched.shape[1] == alone.shape[1]:
        return batched
    n = alone.shape[1]
    return batched[:, -n:] if side == "left" else batched[:, :n]


def check_invokes(case: Case) -> None:
    model, envoy = case.model, case.model.get(case.path)
    alone = []
    for args, kwargs in (case.inputs, case.other):
        with model.trace(*args, **kwargs):
            alone.append((first(envoy.output).save(), case.output(model.output).save()))
    (args_a, kwargs_a), (args_b, kwargs_b) = case.inputs, case.other
    with model.trace() as tracer:
        with tracer.invoke(*args_a, **kwargs_a):
            hidden_a = first(envoy.output).save()
            output_a = case.output(model.output).save()
        with tracer.invoke(*args_b, **kwargs_b):
            hidden_b = first(envoy.output).save()
            output_b = case.output(model.output).save()
    batched = [(hidden_a, output_a), (hidden_b, output_b)]
    for (hidden, output), (hidden_alone, output_alone) in zip(batched, alone):
        torch.testing.assert_close(_unpadded(hidden, hidden_alone, case.side), hidden_alone)
        torch.testing.assert_close(_unpadded(output, output_alone, case.side), output_alone)




def check_grad(case: Case) -> None:
    args, kwargs = case.inputs
    with case.model.trace(*args, **kwargs):
        hidden = first(case.model.get(case.path).output).save()
        hidden.retain_grad()
        case.output(case.model.output).pow(2).sum().backward()
    plain_output, plain_hidden = plain_run(case, grad=True)
    case.output(plain_output).pow(2).sum().backward()
    case.module.zero_grad(set_to_none=True)
    assert hidden.grad is not None and torch.count_nonzero(hidden.grad) > 0
    torch.testing.assert_close(hidden.grad, plain_hidden.grad)


WORKFLOWS = [check_read, check_edit, check_invokes, check_grad]
