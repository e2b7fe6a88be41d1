"""Whether a model catalog fits: its host memory_budget and, when given, its GPUs. What
``glassbox plan`` prints, and what a server checks at start when it has a memory_budget.

Offers:
    plan(config, gpu_memory=0, gpus=0, tokens=128, batch=1) -> Plan   every model of a ServerConfig
    Plan.fits / .problems / .table()      the verdict, the reasons, the table ``glassbox plan`` prints

The numbers are sizing.py's. What must fit memory_budget is a worker's peak, not its rest: the
process once, every model it holds (weights and overhead), and the working memory of one job of
``tokens`` x ``batch`` (the largest of its models'), since a worker runs one job or batch at a time.
The server checks its budget at the defaults (a 128-token job, batch 1): a longer or batched job
needs more, and ``max_memory_bytes`` is what stops one that outgrows the host. Every model counts as
held in host memory, also one that ``device_map`` places on GPUs (then the budget errs on the safe
side). GPUs: a replica needs its weights and one job on the device (no process, no tokenizer), plus
``GPU_RESERVE_BYTES`` on each GPU for the CUDA context and the allocator.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .sizing import (
    DEFAULT_BATCH,
    DEFAULT_TOKENS,
    GPU_RESERVE_BYTES,
    PROCESS_BYTES,
    ModelSize,
    estimate,
    worker_bytes,
)

__all__ = ["Plan", "plan"]


@dataclass
class Plan:
    """Every model of a catalog sized, and the verdict.

        result = plan(ServerConfig.from_catalog("catalog.toml"), gpu_memory=80 * 2**30)
        print(result.table())
        sys.exit(0 if result.fits else 1)
    """

    sizes: list[ModelSize]
    replicas: dict[str, int]
    eager: list[str]
    pinned: list[str]
    memory_budget: int
    gpu_memory: int
    gpus: int
    tokens: int = DEFAULT_TOKENS
    batch: int = DEFAULT_BATCH
    problems: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return not self.problems

    def table(self) -> str:
        """The table ``glassbox plan`` prints, then its verdict."""
        gpu = bool(self.gpu_memory)
        rows = [("model", "parameters", "dtype", "weights", "loaded", "peak", "load", "replicas",
                 "on GPUs" if gpu else "", "GPUs/replica" if gpu else "")]
        for size in self.sizes:
            rows.append((size.name, f"{size.parameters / 1e9:.2f} B" if size.parameters >= 1e9
                         else f"{size.parameters / 1e6:.1f} M", size.dtype, _gib(size.weight_bytes),
                         _gib(size.loaded_bytes), _gib(size.peak_bytes),
                         "eager" if size.name in self.eager else "on_demand",
                         str(self.replicas.get(size.name, 1)), _gib(size.device_bytes) if gpu else "",
                         str(size.devices(self.gpu_memory)) if gpu else ""))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * width for width in widths if width).rstrip())
        lines.append("")
        lines.extend(self._summary())
        return "\n".join(lines)

    def _summary(self) -> list[str]:
        lines = [f"loaded: a worker serving the model alone, {_gib(PROCESS_BYTES)} of it the process",
                 f"peak: the same worker running one job of {self.tokens} tokens x batch {self.batch} "
                 "(--tokens, --batch)"]
        eager = [s for s in self.sizes if s.name in self.eager]
        rest = PROCESS_BYTES + sum(s.held_bytes for s in eager)
        lines.append(f"eager models in one worker: {_gib(rest)} loaded, {_gib(worker_bytes(eager))} at peak"
                     + (f", of a {_gib(self.memory_budget)} memory budget" if self.memory_budget else ""))
        if self.gpu_memory:
            needed = sum(s.devices(self.gpu_memory) * self.replicas.get(s.name, 1) for s in self.sizes)
            lines.append(f"GPUs of {_gib(self.gpu_memory)} needed for every replica at once: {needed}"
                         + (f" of {self.gpus}" if self.gpus else ""))
            lines.append(f"on GPUs: weights + one job, and {_gib(GPU_RESERVE_BYTES)} per GPU for CUDA's "
                         "context and allocator")
        lines.extend(f"does not fit: {problem}" for problem in self.problems)
        lines.append("fits" if self.fits else "does NOT fit")
        return lines


def plan(config: Any, *, gpu_memory: int = 0, gpus: int = 0, tokens: int = DEFAULT_TOKENS,
         batch: int = DEFAULT_BATCH) -> Plan:
    """Size every model of ``config`` (a ServerConfig) for jobs of ``tokens`` x ``batch`` and check
    it against its memory_budget and, when given, GPUs of ``gpu_memory`` bytes (``gpus`` of them in
    the cluster). ValueError when a model cannot be sized or a GPU is smaller than its reserve."""
    if 0 < gpu_memory <= GPU_RESERVE_BYTES:
        raise ValueError(f"--gpu-memory {_gib(gpu_memory)} leaves nothing beside the "
                         f"{_gib(GPU_RESERVE_BYTES)} each GPU keeps for the CUDA context and allocator")
    sizes = [estimate(name, path, config.load_options(name), tokens=tokens, batch=batch)
             for name, path in config.models.items()]
    eager = [n for n in config.models if config.load_mode(n) == "eager"]
    pinned = [n for n in config.models if config.pinned(n)]
    result = Plan(sizes=sizes, replicas=dict(config.replicas), eager=eager, pinned=pinned,
                  memory_budget=config.memory_budget, gpu_memory=gpu_memory, gpus=gpus, tokens=tokens,
                  batch=batch)
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
    at_start = worker_bytes([s for s in sizes if s.name in eager])
    if eager and at_start > budget:
        found.append(f"the eager models ({', '.join(eager)}) need {_gib(at_start)} at peak, over the "
                     f"memory_budget of {_gib(budget)}: raise it or load some on_demand")
    held = [s for s in sizes if s.name in pinned]
    for size in sizes:
        need = worker_bytes(held if size.name in pinned else [*held, size])
        beside = bool(held) and size.name not in pinned
        if need > budget:
            found.append(f"model {size.name!r} needs {_gib(need)} at peak (estimated"
                         + (f", beside the pinned models {', '.join(pinned)}" if beside else "")
                         + f"), over the memory_budget of {_gib(budget)}")
    return found


def _gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB"
