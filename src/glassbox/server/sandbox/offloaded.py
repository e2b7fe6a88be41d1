"""The weights accelerate's offload hooks hold outside the module (device_map with cpu/disk offload).

Offers:
    offloaded_tensors(module) -> [tensors]   the in-memory ones, which ARE the parameters during a forward
"""

from __future__ import annotations

import torch

__all__ = ["offloaded_tensors"]


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
