"""How much memory a served model takes, from its config alone (no weights read): the numbers
``glassbox plan`` prints and ``memory_budget`` is checked with.

Offers:
    estimate(name, path, options, tokens=128, batch=1) -> ModelSize   built on the meta device
    ModelSize      the costs of one model: weight_bytes, overhead_bytes, activation_bytes,
                   logits_bytes, kv_bytes; loaded_bytes / peak_bytes (host), device_bytes and
                   devices(gpu_bytes) (GPU)
    worker_bytes(sizes) -> int     one worker holding these models, at the peak of one job

Whether a catalog fits (``glassbox plan``, memory_budget) is plan.py's, with these numbers.

The model of costs (host memory: the worker's whole resident set, what ``ps`` shows as RSS)::

    loaded  = PROCESS_BYTES           python, torch, transformers, glassbox imported: once a worker
            + weight_bytes            parameters and buffers at the served dtype (tied ones once)
            + overhead_bytes          MODEL_OVERHEAD_BYTES: tokenizer, module objects, wrappers
    peak    = loaded + working        one job of ``tokens`` x ``batch``:
    working = activation_bytes        what autograd keeps for backward (jobs run with gradients on)
            + logits_bytes            [batch, tokens, vocab] at the served dtype
            + kv_bytes                the KV cache the forward fills (and generation grows)
            + FORWARD_SCRATCH_BYTES   kernels' scratch and code a first forward brings in

Activations: per layer and token, a traced forward keeps HIDDEN_COPIES hidden-sized tensors (the
norms' inputs and outputs, the attention output), INTERMEDIATE_COPIES MLP-sized ones (gate, up, the
activation, their product) and QKV_COPIES of the query/key/value projections (before and after
rotary), counted by ``saved_tensors_hooks`` on SmolLM2 (4.0 x intermediate, 6.0 x hidden, 1.6 x
q+k+v per layer) and GPT-2 (5, 4.3, 2); eager attention adds its softmax, heads x tokens. Device
memory (GPU) has no process and no tokenizer: weights + working + GPU_RESERVE_BYTES per GPU.
``bench/catalog.py`` measures real workers against this (README: Sizing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["DEFAULT_BATCH", "DEFAULT_TOKENS", "FORWARD_SCRATCH_BYTES", "GPU_RESERVE_BYTES", "HIDDEN_COPIES",
           "INTERMEDIATE_COPIES", "MODEL_OVERHEAD_BYTES", "PROCESS_BYTES", "QKV_COPIES", "ModelSize",
           "estimate", "worker_bytes"]

_MIB = 2**20
_GIB = 2**30

# An idle worker's RSS: python 3.11, torch 2.13 (CPU wheel), transformers 5, accelerate and glassbox's
# executor imported, prepare_later_loads run. Measured 327-328 MiB by bench/catalog.py (and a served
# worker's RSS matched its probe within 2 MiB). A CUDA build of torch maps more libraries.
PROCESS_BYTES = 328 * _MIB
# What a loaded model holds beside its weights: tokenizer (~50k-token vocabularies here), module
# objects, glassbox's wrappers. Measured loaded - idle - weights: 36 MiB (tiny GPT-2), 38 (tiny
# Llama), 43 (SmolLM2 float32), 60-120 from run to run (SmolLM2 bfloat16: converting its float32
# checkpoint leaves freed memory the allocator keeps). A larger vocabulary's tokenizer takes more.
MODEL_OVERHEAD_BYTES = 56 * _MIB
# A first forward's fixed cost beyond its tensors (kernel scratch, lazily imported code paths):
# measured +8 to +16 MiB for a 2-token trace.
FORWARD_SCRATCH_BYTES = 16 * _MIB
HIDDEN_COPIES = 6  # hidden-sized tensors a layer keeps per token for backward (see the docstring)
INTERMEDIATE_COPIES = 4  # MLP-sized ones
QKV_COPIES = 2  # query, key and value projections, before and after rotary
# Per GPU: the CUDA context (~0.5 GiB with torch's lazily loaded kernels) and the caching
# allocator's fragmentation. An assumption, not measured here (no GPU on the calibration host).
GPU_RESERVE_BYTES = 1 * _GIB
_EAGER = ("eager", "glassbox")  # attention that materialises its probabilities (models/attention.py)
DEFAULT_TOKENS = 128  # a job's length (prompt + generated tokens) the plan sizes one job for
DEFAULT_BATCH = 1  # sequences in that job (co-tenant batching runs several jobs as one)


@dataclass(frozen=True)
class ModelSize:
    """One model's costs, in bytes, for a job of ``tokens`` x ``batch`` (module docstring).

        size = estimate("smollm2", path, {"dtype": "bfloat16"}, tokens=512)
        size.loaded_bytes, size.peak_bytes      # a worker serving it alone: at rest, in a job
        size.devices(80 * 2**30)                # GPUs of 80 GiB one replica needs
    """

    name: str
    parameters: int
    dtype: str
    tokens: int
    batch: int
    weight_bytes: int  # parameters and buffers at the served dtype
    overhead_bytes: int  # tokenizer, module objects: MODEL_OVERHEAD_BYTES
    activation_bytes: int  # what a traced forward keeps for backward
    logits_bytes: int
    kv_bytes: int

    @property
    def held_bytes(self) -> int:
        """What loading this model adds to a worker."""
        return self.weight_bytes + self.overhead_bytes

    @property
    def working_bytes(self) -> int:
        """What one job of ``tokens`` x ``batch`` adds while it runs."""
        return self.activation_bytes + self.logits_bytes + self.kv_bytes + FORWARD_SCRATCH_BYTES

    @property
    def loaded_bytes(self) -> int:
        """A worker serving this model alone, at rest: the process, the weights, the overhead."""
        return PROCESS_BYTES + self.held_bytes

    @property
    def peak_bytes(self) -> int:
        """The same worker while it runs one job of ``tokens`` x ``batch``."""
        return self.loaded_bytes + self.working_bytes

    @property
    def device_bytes(self) -> int:
        """What the model takes on GPUs, before GPU_RESERVE_BYTES per GPU: weights and one job."""
        return self.weight_bytes + self.activation_bytes + self.logits_bytes + self.kv_bytes

    def devices(self, gpu_bytes: int) -> int:
        """GPUs of ``gpu_bytes`` each one replica needs (0 when no GPU size is given)."""
        if gpu_bytes <= 0:
            return 0
        if gpu_bytes <= GPU_RESERVE_BYTES:
            raise ValueError(f"a GPU of {gpu_bytes / _GIB:.2f} GiB leaves nothing beside the "
                             f"{GPU_RESERVE_BYTES / _GIB:.2f} GiB kept for CUDA (GPU_RESERVE_BYTES)")
        return math.ceil(self.device_bytes / (gpu_bytes - GPU_RESERVE_BYTES))


def worker_bytes(sizes: list[ModelSize]) -> int:
    """One worker holding every model of ``sizes``, at the peak of one job (a worker runs one job or
    batch at a time): the process once, each model's weights and overhead, the largest working set."""
    return PROCESS_BYTES + sum(s.held_bytes for s in sizes) + max((s.working_bytes for s in sizes), default=0)


def estimate(name: str, path: str, options: dict[str, Any] | None = None, *, tokens: int = DEFAULT_TOKENS,
             batch: int = DEFAULT_BATCH) -> ModelSize:
    """The costs of the model at ``path`` as ``options`` (the catalog's: dtype, ...) would load it,
    for jobs of ``tokens`` x ``batch``. Reads only its config (a folder, or a hub id in the local
    cache); ValueError saying what is missing if there is none."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if tokens < 1 or batch < 1:
        raise ValueError(f"tokens and batch must be 1 or more, got tokens={tokens}, batch={batch}")
    options = dict(options or {})
    kwargs = {k: options[k] for k in ("revision", "subfolder", "trust_remote_code") if k in options}
    try:
        # Never a download: sizing reads what is on this machine (a hub id must be in the cache).
        config = AutoConfig.from_pretrained(path, local_files_only=True, **kwargs)
    except (OSError, ValueError) as err:
        raise ValueError(f"model {name!r}: cannot read its config.json from {path!r} to size it "
                         f"({err})") from None
    dtype = _dtype(options.get("dtype"), config)
    with torch.device("meta"):
        module = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=kwargs.get(
            "trust_remote_code", False))
    seen: set[int] = set()
    parameters = weight = 0
    for tensor in [*module.parameters(), *module.buffers()]:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        weight += tensor.numel() * tensor.element_size()
        if isinstance(tensor, torch.nn.Parameter):
            parameters += tensor.numel()
    # the catalog's attention, else what transformers picks for this model (sdpa where it can)
    attention = options.get("attn_implementation") or getattr(module.config, "_attn_implementation", None)
    shape = _Shape.of(module.config, eager=attention in _EAGER)
    width = dtype.itemsize
    return ModelSize(name=name, parameters=parameters, dtype=str(dtype).removeprefix("torch."), tokens=tokens,
                     batch=batch, weight_bytes=weight, overhead_bytes=MODEL_OVERHEAD_BYTES,
                     activation_bytes=shape.activations(tokens) * tokens * batch * width,
                     logits_bytes=shape.vocab * tokens * batch * width,
                     kv_bytes=2 * shape.layers * shape.kv_heads * shape.head_dim * tokens * batch * width)


@dataclass(frozen=True)
class _Shape:
    """What the working memory depends on, read from a (text) config under its standard names."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    eager: bool  # eager attention keeps its softmax (heads x tokens x tokens per layer)

    @classmethod
    def of(cls, config: Any, *, eager: bool) -> _Shape:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        hidden, heads = int(text.hidden_size), int(text.num_attention_heads)
        # GPT-2 names its MLP width n_inner, None meaning 4 x hidden
        intermediate = getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None)
        return cls(layers=int(text.num_hidden_layers), hidden=hidden,
                   intermediate=int(intermediate or 4 * hidden), heads=heads,
                   kv_heads=int(getattr(text, "num_key_value_heads", None) or heads),
                   head_dim=int(getattr(text, "head_dim", None) or hidden // heads),
                   vocab=int(text.vocab_size), eager=eager)

    def activations(self, tokens: int) -> int:
        """Elements a traced forward keeps per token, all layers."""
        qkv = (self.heads + 2 * self.kv_heads) * self.head_dim
        per_layer = HIDDEN_COPIES * self.hidden + INTERMEDIATE_COPIES * self.intermediate + QKV_COPIES * qkv
        return self.layers * (per_layer + (self.heads * tokens if self.eager else 0))


def _dtype(requested: Any, config: Any) -> Any:
    import torch

    if requested in (None, "auto"):
        # transformers 5 loads in the checkpoint's dtype by default (config.dtype), else float32.
        found = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if found is None:
            return torch.float32
        return found if isinstance(found, torch.dtype) else getattr(torch, str(found).removeprefix("torch."))
    return getattr(torch, str(requested))
