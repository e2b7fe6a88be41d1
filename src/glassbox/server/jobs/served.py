"""What keeps the models a worker serves the same for every job.

Offers:
    watch(model) / unwatch(model, name)   snapshot a loaded model's weights / forget an evicted one
    use_model(models, name)       the model a job asks for (LookupError naming the served ones)
    restore_changed(model) -> [names]   put back what changed since loading (co-tenant batches
                                  call it before replying; after_job after each job)
    after_job(models) -> {name: [restored tensors]}
                                  verify every weight of the models the last job(s) used and restore
                                  what changed; reset grads and torch state. The worker calls it
                                  after SENDING each result and before taking the next job, so the
                                  checksum (~0.2 s on SmolLM2) is off the round trip.

Loading models (which needs glassbox's model classes) is loading.py's: this module, used by
every job (execute.py), stays free of them, so the in-process runner of ``remote="local"``
(inprocess.py) can be reached from the client without an import cycle.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from ...envoy import module_of
from .integrity import WeightGuard

__all__ = ["after_job", "restore_changed", "unwatch", "use_model", "watch"]

_guards: dict[int, WeightGuard] = {}
_last_model: list[str] = []  # the models the last job(s) ran on: the only ones they could reach


def _guard(model: Any) -> WeightGuard:
    guard = _guards.get(id(module_of(model)))
    if guard is None:
        # Weights off the CPU cannot be sealed (sealed.py): their checksum is keyed, so that code
        # that found a write path cannot also forge a change that keeps the sum.
        keyed = any(p.device.type != "cpu" for p in module_of(model).parameters())
        guard = _guards[id(module_of(model))] = WeightGuard(module_of(model), keyed=keyed)
    return guard


def watch(model: Any) -> None:
    """Snapshot a newly loaded model's weights: every later job is checked against this."""
    _guard(model)


def unwatch(model: Any, name: str) -> None:
    """Forget an evicted model's snapshot (and that the last job used it)."""
    _guards.pop(id(module_of(model)), None)
    if name in _last_model:
        _last_model.remove(name)


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
