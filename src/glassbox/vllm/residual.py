"""The residual stream of a vLLM decoder layer, in Hugging Face's meaning.

Offers:
    residual_stream(layer_output) -> Tensor     hidden + residual: what a Hugging Face decoder
                                                layer returns (the stream after the layer)
    set_residual_stream(layer_output, value)    make the stream after the layer ``value`` (in place)

vLLM's Llama-style decoder layers return ``(hidden, residual)`` and leave the addition to the next
layer's fused add-and-norm, so neither element alone is the residual stream that Hugging Face models,
papers and the seed's workflows (logit lens, patching, steering) mean; their sum is, equal to the
Hugging Face value within float tolerance (float32 SmolLM2: 1e-3 relative on every layer). Adding a vector to
``output[0]`` adds it to the stream (the sum is linear), so steering needs no helper. Layers that
return a single tensor (GPT-2 style) already return the stream; both helpers accept that too.

    with model.trace("The Eiffel Tower is in", temperature=0.0) as tracer:
        stream = residual_stream(model.model.layers[5].output).save()
"""

from __future__ import annotations

from typing import Any

import torch


def _parts(layer_output: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(layer_output, torch.Tensor):
        return layer_output, None
    if isinstance(layer_output, (tuple, list)) and layer_output and isinstance(layer_output[0], torch.Tensor):
        residual = layer_output[1] if len(layer_output) > 1 else None
        return layer_output[0], residual if isinstance(residual, torch.Tensor) else None
    raise TypeError(
        "expected a decoder layer's output ((hidden, residual) or a tensor), got "
        f"{type(layer_output).__name__}"
    )


def residual_stream(layer_output: Any) -> torch.Tensor:
    """The residual stream after a vLLM decoder layer: ``hidden + residual`` ([tokens, hidden])."""
    hidden, residual = _parts(layer_output)
    return hidden if residual is None else hidden + residual


def set_residual_stream(layer_output: Any, value: torch.Tensor) -> None:
    """Make the residual stream after the layer equal ``value`` (in place: hidden := value,
    residual := 0, so the next layer's add-and-norm sees exactly ``value``)."""
    hidden, residual = _parts(layer_output)
    hidden.copy_(value)
    if residual is not None:
        residual.zero_()
