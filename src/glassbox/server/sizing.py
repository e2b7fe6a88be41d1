"""How much memory a served model takes, from its config alone (no weights read), and whether a
catalog fits: what ``glassbox plan`` prints and what on-demand loading budgets with.

Offers:
    estimate(path, options) -> ModelSize     one model, built on the meta device
    ModelSize                                parameters, dtype, weight_bytes, runtime_bytes,
                                             devices(gpu_bytes)
    RUNTIME_FACTOR, RUNTIME_OVERHEAD         runtime memory = weights x RUNTIME_FACTOR + RUNTIME_OVERHEAD
    plan(config, gpu_memory=0, gpus=0) -> Plan    every model of a ServerConfig, and whether it fits
    Plan.table() -> str                      the table ``glassbox plan`` prints

The estimate: the model is instantiated on the meta device from its ``config.json`` (no memory,
no weights), its parameters and buffers counted at the dtype it will be served in (tied weights
once), and the runtime estimate is that times ``RUNTIME_FACTOR`` = 1.15 (activations and allocator
slack, the margin the reference service sizes GPUs with) plus ``RUNTIME_OVERHEAD`` = 160 MiB for
what does not grow with the weights (tokenizer, module objects, torch's runtime: 130-160 MiB
measured on SmolLM2). ``bench/catalog.py`` compares it with what a loaded replica measures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["RUNTIME_FACTOR", "RUNTIME_OVERHEAD", "ModelSize", "Plan", "estimate", "plan"]

RUNTIME_FACTOR = 1.15
RUNTIME_OVERHEAD = 160 * 2**20
_GIB = 1024**3


@dataclass(frozen=True)
class ModelSize:
    name: str
    parameters: int
    dtype: str
    weight_bytes: int  # parameters and buffers at the served dtype
    runtime_bytes: int  # weight_bytes x RUNTIME_FACTOR + RUNTIME_OVERHEAD

    def devices(self, gpu_bytes: int) -> int:
        """GPUs of ``gpu_bytes`` each one replica needs (0 when no GPU size is given)."""
        return math.ceil(self.runtime_bytes / gpu_bytes) if gpu_bytes > 0 else 0


def estimate(name: str, path: str, options: dict[str, Any] | None = None) -> ModelSize:
    """The size of the model at ``path`` as ``options`` (the catalog's: dtype, ...) would load it.
    Reads only its config (a folder, or a hub id in the local cache); ValueError saying what is
    missing if there is none."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

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
    return ModelSize(name=name, parameters=parameters, dtype=str(dtype).removeprefix("torch."),
                     weight_bytes=weight, runtime_bytes=int(weight * RUNTIME_FACTOR) + RUNTIME_OVERHEAD)


def _dtype(requested: Any, config: Any) -> Any:
    import torch

    if requested in (None, "auto"):
        # transformers 5 loads in the checkpoint's dtype by default (config.dtype), else float32.
        found = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if found is None:
            return torch.float32
        return found if isinstance(found, torch.dtype) else getattr(torch, str(found).removeprefix("torch."))
    return getattr(torch, str(requested))


@dataclass
class Plan:
    sizes: list[ModelSize]
    replicas: dict[str, int]
    eager: list[str]
    pinned: list[str]
    memory_budget: int
    gpu_memory: int
    gpus: int
    problems: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return not self.problems

    def table(self) -> str:
        """The table ``glassbox plan`` prints, then its verdict."""
        rows = [("model", "parameters", "dtype", "weights", "runtime (est.)", "load", "replicas",
                 "GPUs/replica" if self.gpu_memory else "")]
        for size in self.sizes:
            rows.append((size.name, f"{size.parameters / 1e9:.2f} B" if size.parameters >= 1e9
                         else f"{size.parameters / 1e6:.1f} M", size.dtype, _gib(size.weight_bytes),
                         _gib(size.runtime_bytes), "eager" if size.name in self.eager else "on_demand",
                         str(self.replicas.get(size.name, 1)),
                         str(size.devices(self.gpu_memory)) if self.gpu_memory else ""))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * width for width in widths if width).rstrip())
        lines.append("")
        lines.extend(self._summary())
        return "\n".join(lines)

    def _summary(self) -> list[str]:
        eager = sum(s.runtime_bytes for s in self.sizes if s.name in self.eager)
        lines = [f"loaded at start: {_gib(eager)}"
                 + (f" of a {_gib(self.memory_budget)} memory budget" if self.memory_budget else "")]
        if self.gpu_memory:
            needed = sum(s.devices(self.gpu_memory) * self.replicas.get(s.name, 1) for s in self.sizes)
            lines.append(f"GPUs of {_gib(self.gpu_memory)} needed for every replica at once: {needed}"
                         + (f" of {self.gpus}" if self.gpus else ""))
        lines.extend(f"does not fit: {problem}" for problem in self.problems)
        lines.append("fits" if self.fits else "does NOT fit")
        return lines


def plan(config: Any, *, gpu_memory: int = 0, gpus: int = 0) -> Plan:
    """Size every model of ``config`` (a ServerConfig) and check it against its memory_budget and,
    when given, GPUs of ``gpu_memory`` bytes (``gpus`` of them in the cluster)."""
    sizes = [estimate(name, path, config.load_options(name)) for name, path in config.models.items()]
    eager = [n for n in config.models if config.load_mode(n) == "eager"]
    pinned = [n for n in config.models if config.pinned(n)]
    result = Plan(sizes=sizes, replicas=dict(config.replicas), eager=eager, pinned=pinned,
                  memory_budget=config.memory_budget, gpu_memory=gpu_memory, gpus=gpus)
    result.problems = _problems(sizes, eager, pinned, config.memory_budget)
    if gpu_memory and gpus:
        needed = sum(s.devices(gpu_memory) * result.replicas.get(s.name, 1) for s in sizes)
        if needed > gpus:
            result.problems.append(f"every replica at once needs {needed} GPUs of {_gib(gpu_memory)}; "
                                   f"the cluster has {gpus}")
    return result


def _problems(sizes: list[ModelSize], eager: list[str], pinned: list[str], budget: int) -> list[str]:
    """What keeps these models from fitting ``budget`` (empty: they fit, or there is no budget)."""
    if not budget:
        return []
    found = []
    at_start = sum(s.runtime_bytes for s in sizes if s.name in eager)
    if at_start > budget:
        found.append(f"the eager models ({', '.join(eager)}) need {_gib(at_start)} at start, over the "
                     f"memory_budget of {_gib(budget)}: raise it or load some on_demand")
    held = sum(s.runtime_bytes for s in sizes if s.name in pinned)
    for size in sizes:
        extra = 0 if size.name in pinned else size.runtime_bytes
        if held + extra > budget:
            found.append(f"model {size.name!r} needs {_gib(size.runtime_bytes)} (estimated)"
                         + (f" beside the pinned models' {_gib(held)}" if held and extra else "")
                         + f", over the memory_budget of {_gib(budget)}")
    return found


def _gib(size: int) -> str:
    return f"{size / _GIB:.2f} GiB"
