"""What a module holds that the sandbox protects: its submodules, its weights and buffers, and the
weights accelerate's offload hooks hold outside it (device_map with cpu/disk offload).

Offers:
    offloaded_tensors(module) -> [tensors]   the in-memory ones, which ARE the parameters during a forward
    protected_parts(module) -> (modules, tensors)
                                             every submodule and every tensor above (none on the meta
                                             device), walked once per module and remembered

Why remembered: every job's sandbox protects the served model, and walking SmolLM2's 30 layers
costs ~2.5 ms a walk (a job made two), more on a busy machine, and in a job's forked process each
walk writes reference counts into pages it shares with the worker (copy-on-write faults). The
worker walks each model once after loading it, before any job process is forked, so every job
finds the walk done. It stays right: a job cannot add or remove submodules or weights of a served
model (the sandbox refuses it; a job's process ends with the job, and a job run in the worker is
checked and put back afterwards, ``jobs/integrity.py``).
"""

from __future__ import annotations

import weakref

import torch

__all__ = ["offloaded_tensors", "protected_parts"]

_walked: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # an evicted model is forgotten


def protected_parts(module: torch.nn.Module) -> tuple[tuple[torch.nn.Module, ...], tuple[torch.Tensor, ...]]:
    """Every submodule of ``module`` (itself included) and every tensor the sandbox protects in it."""
    parts = _walked.get(module)
    if parts is None:
        tensors = [t for t in (*module.parameters(), *module.buffers(), *offloaded_tensors(module))
                   if t.device.type != "meta"]  # an offloaded weight's placeholder: its values are in
        parts = (tuple(module.modules()), tuple(tensors))  # the hooks' weights map (offloaded_tensors)
        _walked[module] = parts
    return parts


def offloaded_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    """The CPU tensors accelerate's offload hooks put into ``module``'s submodules for each forward
    (device_map with "cpu"/"disk" offload): during the forward the parameters ARE these tensors,
    so they are protected like weights. Disk-offloaded ones are read afresh from read-only mapped
    files at each forward; only those held in memory (``state_dict``) are listed."""
    found: dict[int, torch.Tensor] = {}
    for sub in module.modules():
        hook = getattr(sub, "_hf_hook", None)
        for one in getattr(hook, "hooks", None) or [hook]:
            dataset = getattr(getattr(one, "weights_map", None), "dataset", None)
            state = getattr(dataset, "state_dict", None)
            if isinstance(state, dict):
                found.update((id(t), t) for t in state.values() if isinstance(t, torch.Tensor))
    return list(found.values())
