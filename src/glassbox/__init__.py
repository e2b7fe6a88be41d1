"""glassbox: read, edit and patch the internals of any PyTorch model.

    from glassbox import NNsight
    net = NNsight(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()))
    with net.trace(torch.randn(2, 4)):
        hidden = net[0].output.save()
"""

from .activations import ActivationDataset, extract
from .cache import Cache, CacheEntry
from .config import CONFIG
from .envoy import Envoy
from .errors import GlassboxError, MissedModuleError, OutOfOrderError, RemoteError, TraceStateError
from .models.base import NNsight
from .models.generation import GenerateTracer
from .models.language import LanguageModel
from .models.transformers_model import TransformersModel, VisionLanguageModel
from .remote.client import JobHandle, NotSavedError
from .session import Session
from .source import Source  # importing it registers Envoy.source (envoy.py cannot import it)
from .tracing import Invoker, Tracer, save
from .version import __version__

__all__ = [
    "CONFIG",
    "ActivationDataset",
    "Cache",
    "CacheEntry",
    "Envoy",
    "GenerateTracer",
    "GlassboxError",
    "Invoker",
    "JobHandle",
    "LanguageModel",
    "MissedModuleError",
    "NNsight",
    "NotSavedError",
    "OutOfOrderError",
    "RemoteError",
    "Session",
    "Source",
    "TraceStateError",
    "Tracer",
    "TransformersModel",
    "VisionLanguageModel",
    "__version__",
    "extract",
    "save",
]


def __getattr__(name: str):
    # glassbox.plot on first use, so `import glassbox` never needs the optional matplotlib
    if name == "plot":
        import importlib

        return importlib.import_module(".plot", __name__)
    # glassbox.VLLM on first use: vLLM pins its own torch and transformers and lives in its own
    # virtualenv, so `import glassbox` never imports it (VLLM itself needs it only to start an engine:
    # a handle on a server's vLLM model traces remotely without it)
    if name == "VLLM":
        from .vllm import VLLM

        return VLLM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
