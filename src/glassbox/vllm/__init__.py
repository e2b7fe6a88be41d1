"""glassbox on vLLM: the same trace code on vLLM's engine (needs vLLM; see docs/vllm.md).

    from glassbox.vllm import VLLM, residual_stream
    model = VLLM(path, dtype="float32")
    with model.trace("The Eiffel Tower is in", temperature=0.0, max_tokens=3) as tracer:
        stream = residual_stream(model.model.layers[5].output).save()

Offers: VLLM, VLLMTracer (model.py), Completion (engine.py), residual_stream and
set_residual_stream (residual.py).
"""

from .engine import Completion
from .model import VLLM, VLLMTracer
from .residual import residual_stream, set_residual_stream

__all__ = ["VLLM", "Completion", "VLLMTracer", "residual_stream", "set_residual_stream"]
