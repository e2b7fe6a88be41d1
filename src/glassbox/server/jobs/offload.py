"""Disk-offloaded weights as the worker can afford them: read-only memory-mapped files of their own.

Offers:
    own_offload_files(module) -> int   write each disk-offloaded weight that accelerate reads from the
                                       checkpoint into the model's offload_folder; returns how many

Why: for a safetensors checkpoint, transformers' disk offload (``device_map`` with "disk",
``offload_folder``) does not copy the weights: accelerate's hook opens the checkpoint file again
for every offloaded weight at every forward, and each open maps the WHOLE file as private
writable memory, which the worker's memory limit (RLIMIT_DATA, ``max_memory_bytes``) counts. Two
layers of SmolLM2 meant 30 mappings of its 538 MB file: a 6 GiB limit failed in the first forward
(measured). accelerate's own format, one ``.dat`` file per weight read with ``np.memmap(mode="r")``
(a shared read-only mapping, not counted, and unwritable by a job) costs one copy on disk, once,
at load time.
"""

from __future__ import annotations

import os

import torch

__all__ = ["own_offload_files"]


def own_offload_files(module: torch.nn.Module) -> int:
    from accelerate.utils import offload_weight, save_offload_index
    from safetensors import safe_open

    loaders = {}
    for sub in module.modules():
        hook = getattr(sub, "_hf_hook", None)
        for one in getattr(hook, "hooks", None) or [hook]:
            dataset = getattr(getattr(one, "weights_map", None), "dataset", None)
            if getattr(dataset, "save_folder", None) and isinstance(getattr(dataset, "index", None), dict):
                loaders[id(dataset)] = dataset
    moved = 0
    for loader in loaders.values():
        for key, info in list(loader.index.items()):
            source = info.get("safetensors_file")
            if source is None:
                continue
            with safe_open(source, framework="pt", device="cpu") as file:
                tensor = file.get_tensor(info.get("weight_name", key))
            if "dtype" in info:
                tensor = tensor.to(getattr(torch, info["dtype"]))
            offload_weight(tensor, key, loader.save_folder, index=loader.index)  # replaces index[key]
            moved += 1
        if moved:
            os.makedirs(loader.save_folder, exist_ok=True)
            save_offload_index(loader.index, loader.save_folder)
    return moved
