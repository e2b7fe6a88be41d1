"""Loading and evicting the models a worker serves.

Offers:
    load_models(specs)            {name: folder or hub id, or {"path": ..., "options": {...}}} ->
                                  loaded LanguageModels (``options``: dtype, device_map, ... as
                                  LanguageModel takes them): parameters in read-only memory
                                  (sealed.py), server paths hidden, the rest (buffers) snapshotted
    load_model(name, spec) / unload_model(models, name)   one model, for on-demand loading
                                  (``"share_weights": DIR`` in a spec: the weights in one read-only
                                  file there, mapped by every replica on the machine: sealed.py)
                                  (a spec with ``"engine": "vllm"``: a glassbox.VLLM, vllm_served.py)
    prepare_later_loads()         in the worker before it is confined: what a later (on-demand)
                                  load needs that a confined process can no longer do

The weight guards they register live in served.py, which every job uses.
"""

from __future__ import annotations

import ctypes
import gc
import sys
from typing import Any

from ...envoy import module_of
from ..sandbox.offloaded import protected_parts
from .offload import own_offload_files
from .sealed import release, seal
from .served import unwatch, watch

__all__ = ["load_model", "load_models", "prepare_later_loads", "unload_model"]


def prepare_later_loads() -> None:
    """Called once by the worker before it is confined (workers/child.py ``start``), so that a model
    loaded on demand after that loads as it would have at start. Measured: Python's ``tempfile``
    finds its directory by writing a probe file into it, which a confined worker may not do, and
    ``huggingface_hub`` asks for it on import, so a catalog whose models all load on demand failed
    its first load with "No usable temporary directory found". The directory found now is cached by
    ``tempfile``. Loading also imports ``torch._dynamo``, which creates its cache folder in the
    temporary directory at import. The loading stack is imported now (an import that only reads
    would still work later, but one done here is not paid by the first tenant's job)."""
    import tempfile

    tempfile.gettempdir()
    import accelerate  # noqa: F401  (device_map / offloading)
    import huggingface_hub.hf_api  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch._dynamo  # noqa: F401  (loading imports it; at import it creates its cache folder in /tmp)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401


def load_models(specs: dict[str, Any]) -> dict[str, Any]:
    """Load each served model with its weights (``LanguageModel(path, dispatch=True, **options)``)."""
    return {name: load_model(name, spec) for name, spec in specs.items()}


def load_model(name: str, spec: Any) -> Any:
    """One model: ``spec`` is its path, or ``{"path": ..., "options": {...}}`` (the catalog's
    LanguageModel options: dtype, device_map, max_memory, offload_folder, ...), meaning exactly
    what they mean to a local ``LanguageModel``, so remote values equal local ones."""
    from ...models.language import LanguageModel

    if isinstance(spec, dict) and spec.get("engine", "hf") != "hf":
        from .vllm_served import load_vllm

        return load_vllm(name, spec)
    path, options = (spec, {}) if isinstance(spec, str) else (spec["path"], dict(spec.get("options") or {}))
    share_dir = "" if isinstance(spec, str) else str(spec.get("share_weights") or "")
    shown = ", ".join(f"{k}={v!r}" for k, v in options.items())
    print(f"[glassbox worker] loading {name} from {path}{' (' + shown + ')' if shown else ''}",
          file=sys.stderr, flush=True)
    model = LanguageModel(path, dispatch=True, **options)
    own_offload_files(module_of(model))
    sealed = seal(module_of(model), share_dir=share_dir)
    shared = f", a file shared by every server process of {share_dir} holding it" if share_dir else ""
    print(f"[glassbox worker] {name}: {sealed / 2**20:.0f} MiB of weights in read-only memory{shared}",
          file=sys.stderr, flush=True)
    _hide_paths(model, name)
    watch(model)
    protected_parts(module_of(model))  # what every job's sandbox protects, walked once, before any fork
    _give_back_freed_memory()  # the weights' pre-seal copies: ~2x the model held until some later malloc
    return model


def _give_back_freed_memory() -> None:
    gc.collect()
    try:  # hand freed heap pages back to the OS now (glibc keeps them otherwise)
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def unload_model(models: dict[str, Any], name: str) -> int:
    """Evict ``name`` from ``models`` and give its memory back to the system; returns the bytes of
    read-only weight memory unmapped. Only the worker calls it, between jobs: no job holds the model."""
    model = models.pop(name, None)
    if model is None:
        return 0
    unwatch(model, name)
    freed = release(module_of(model))
    del model
    _give_back_freed_memory()
    return freed


def _hide_paths(model: Any, name: str) -> None:
    """Where the weights lie on the server is nobody's business: the config, generation config and
    tokenizer say the served name instead."""
    module = module_of(model)
    for obj in (getattr(module, "config", None), getattr(module, "generation_config", None)):
        if obj is not None and hasattr(obj, "_name_or_path"):
            obj._name_or_path = name
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        if hasattr(tokenizer, "name_or_path"):
            try:
                tokenizer.name_or_path = name
            except AttributeError:  # a read-only property in some tokenizer classes
                pass
        init_kwargs = getattr(tokenizer, "init_kwargs", None)
        if isinstance(init_kwargs, dict):
            for key in ("name_or_path", "vocab_file", "merges_file", "tokenizer_file"):
                init_kwargs.pop(key, None)
