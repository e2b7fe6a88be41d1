"""The models a worker serves, and what keeps them the same for every job.

Offers:
    load_models(specs)            {name: folder or hub id, or {"path": ..., "options": {...}}} ->
                                  loaded LanguageModels (``options``: dtype, device_map, ... as
                                  LanguageModel takes them): parameters in read-only memory
                                  (sealed.py), server paths hidden, the rest (buffers) snapshotted
    load_model(name, spec) / unload_model(models, name)   one model, for on-demand loading
    use_model(models, name)       the model a job asks for (LookupError naming the served ones)
    restore_changed(model) -> [names]   put back what changed since loading (co-tenant batches
                                  call it before replying; after_job after each job)
    after_job(models) -> {name: [restored tensors]}
                                  verify every weight of the models the last job(s) used and restore
                                  what changed; reset grads and torch state. The worker calls it
                                  after SENDING each result and before taking the next job, so the
                                  checksum (~0.2 s on SmolLM2) is off the round trip.
"""

from __future__ import annotations

import ctypes
import gc
import sys
from typing import Any

import torch

from .integrity import WeightGuard
from .offload import own_offload_files
from .sealed import release, seal

__all__ = ["after_job", "load_model", "load_models", "restore_changed", "unload_model", "use_model"]

_guards: dict[int, WeightGuard] = {}
_last_model: list[str] = []  # the models the last job(s) ran on: the only ones they could reach


def load_models(specs: dict[str, Any]) -> dict[str, Any]:
    """Load each served model with its weights (``LanguageModel(path, dispatch=True, **options)``)."""
    return {name: load_model(name, spec) for name, spec in specs.items()}


def load_model(name: str, spec: Any) -> Any:
    """One model: ``spec`` is its path, or ``{"path": ..., "options": {...}}`` (the catalog's
    LanguageModel options: dtype, device_map, max_memory, offload_folder, ...), meaning exactly
    what they mean to a local ``LanguageModel``, so remote values equal local ones."""
    from ...models.language import LanguageModel

    path, options = (spec, {}) if isinstance(spec, str) else (spec["path"], dict(spec.get("options") or {}))
    shown = ", ".join(f"{k}={v!r}" for k, v in options.items())
    print(f"[glassbox worker] loading {name} from {path}{' (' + shown + ')' if shown else ''}",
          file=sys.stderr, flush=True)
    model = LanguageModel(path, dispatch=True, **options)
    own_offload_files(model._module)
    sealed = seal(model._module)
    print(f"[glassbox worker] {name}: {sealed / 2**20:.0f} MiB of weights in read-only memory",
          file=sys.stderr, flush=True)
    _hide_paths(model, name)
    _guard(model)
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
    _guards.pop(id(model._module), None)
    if name in _last_model:
        _last_model.remove(name)
    freed = release(model._module)
    del model
    _give_back_freed_memory()
    print(f"[glassbox worker] evicted {name} ({freed / 2**20:.0f} MiB of weights unmapped)",
          file=sys.stderr, flush=True)
    return freed


def _hide_paths(model: Any, name: str) -> None:
    """Where the weights lie on the server is nobody's business: the config, generation config and
    tokenizer say the served name instead."""
    for obj in (getattr(model._module, "config", None), getattr(model._module, "generation_config", None)):
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


def _guard(model: Any) -> WeightGuard:
    guard = _guards.get(id(model._module))
    if guard is None:
        # Weights off the CPU cannot be sealed (sealed.py): their checksum is keyed, so that code
        # that found a write path cannot also forge a change that keeps the sum.
        keyed = any(p.device.type != "cpu" for p in model._module.parameters())
        guard = _guards[id(model._module)] = WeightGuard(model._module, keyed=keyed)
    return guard


def use_model(models: dict[str, Any], name: Any) -> Any:
    """The served model a job asks for (LookupError naming the served ones if there is none);
    its weights are snapshotted before the first job touches it and checked after each job."""
    if name not in models:
        served = ", ".join(sorted(models)) or "none"
        raise LookupError(f"model {name!r} is not served here; this server serves: {served}")
    if name not in _last_model:
        _last_model.append(name)
    _guard(models[name])
    return models[name]


def restore_changed(model: Any) -> list[str]:
    """Put back whatever of ``model``'s weights and buffers changed since it was loaded; their
    names ([] if none). Read-only parameters (sealed.py) cost only an identity check."""
    guard = _guard(model)
    changed = guard.verify()
    if changed:
        guard.restore()
    return changed


def after_job(models: dict[str, Any]) -> dict[str, list[str]]:
    """Between two jobs: put back any weight the last job changed (by model name).
    A job only ever holds its own model, so only that one is checked (checking
    SmolLM2 after every job on a tiny model would delay the next job ~0.2 s)."""
    restored = {}
    names, _last_model[:] = list(_last_model), []
    for name in (n for n in names if n in models):
        model = models[name]
        changed = _reset(model)
        if changed:
            restored[name] = changed
            print(f"[glassbox worker] restored weights of {name} after a job: {changed}",
                  file=sys.stderr, flush=True)
    return restored


def _reset(model: Any) -> list[str]:
    """Leave nothing from this job for the next: weights, grads, torch state.
    Returns the names of tensors that had changed (and were restored).

    Every weight is checked after every job, on purpose: a job can write a weight
    along a path the sandbox does not see and still complete normally, and a
    version counter does not move on ``param.data.zero_()``. Checking only after
    suspicious jobs would hand the next user (often already queued) a changed
    model. The check runs in ``after_job``, after the reply has been sent and
    before the next job starts: the same guarantee, off the round trip
    (bench/remote_latency.py measured it at 0.2-0.3 s of a SmolLM2 round trip)."""
    guard = _guard(model)
    changed = restore_changed(model)
    guard.clear_grads()
    torch.set_grad_enabled(True)
    model.active = None
    return changed
