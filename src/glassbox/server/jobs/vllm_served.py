"""Serving a model on vLLM (catalog ``engine = "vllm"``): how its worker loads it.

Offers:
    load_vllm(name, spec) -> glassbox.VLLM     the engine started, its weights guarded, server paths hidden

A vLLM model has a worker process of its own, started with the vLLM virtualenv's Python
(``workers/local.py``, ``ServerConfig.vllm_python``) and running every job in itself
(``--isolation none`` for that worker's jobs: vLLM's engine runs threads, so the process can be
neither forked per job nor confined whole; it confines itself in place once loaded:
``workers/local.py``). Its weights are not sealed into read-only memory (vLLM owns and
lays them out itself); instead the worker's ``after_job`` checks every weight after each job or
batch and puts back what changed (``served.py``), as for any ``--isolation none`` worker, and a
co-tenant batch checks them before any reply leaves (``cotenant.py``).

Jobs run through the same executor as Hugging Face models: ``execute.run_job`` (one job, the
trace's completions sent back as ``tracer.result``) and ``cotenant.run_batch`` (generation jobs of
several tenants as the requests of ONE vLLM trace: continuous batching, each with its own
sampling parameters and rows).
"""

from __future__ import annotations

import sys
from typing import Any

from ...envoy import module_of
from .served import watch

__all__ = ["load_vllm"]


def load_vllm(name: str, spec: dict[str, Any]) -> Any:
    """``glassbox.VLLM(path, **options)`` with its engine started (options: dtype, max_model_len,
    kv_cache_gib: the catalog's, meaning what they mean locally, so remote values equal local ones)."""
    from ...vllm import VLLM

    path, options = spec["path"], dict(spec.get("options") or {})
    shown = ", ".join(f"{k}={v!r}" for k, v in options.items())
    print(f"[glassbox worker] loading {name} on vLLM from {path}{' (' + shown + ')' if shown else ''}",
          file=sys.stderr, flush=True)
    model = VLLM(path, dispatch=True, **options)
    _hide_paths(model, name)
    watch(model)  # the snapshot every later job is checked against
    return model


def _hide_paths(model: Any, name: str) -> None:
    """Error messages and descriptions say the served name, never the server's folders."""
    config = getattr(module_of(model), "config", None)
    if config is not None and hasattr(config, "_name_or_path"):
        config._name_or_path = name
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None and hasattr(tokenizer, "name_or_path"):
        try:
            tokenizer.name_or_path = name
        except AttributeError:  # a read-only property in some tokenizer classes
            pass
