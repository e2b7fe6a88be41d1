"""VLLM: a vLLM engine in this process, traced with the same code as a LanguageModel.

Offers:
    VLLM(path, dtype="auto", seed=0, max_model_len=None, kv_cache_gib=1.0, tokenizer=None,
         dispatch=False, remote_name=None, **llm_kwargs)  (``**llm_kwargs``: more ``vllm.LLM`` options)
        ``VLLM("name")`` for a model a glassbox server serves with engine = "vllm" (and that is no
        folder here nor in the local HF cache: models/hosted.py has the rules, and the stderr line
        that says the server is asked): a handle for ``remote=True`` traces only (no engine, and no
        vLLM needed here)
        the envoy tree over the engine's torch model (vLLM's module names: ``model.model.layers[i]``,
        ``.self_attn.qkv_proj``, ``.mlp.gate_up_proj``), plus ``model.logits`` (the step's logits,
        one row per request) and ``model.samples`` (the sampled token ids, editable); the engine
        starts at the first trace (or ``dispatch=True``); ``.tokenizer``, ``.engine``, ``.llm``
    VLLMTracer
        ``with model.trace(prompt, **sampling) as tracer:`` one request; ``with model.trace(**defaults)``
        plus ``tracer.invoke(prompt, **sampling)``: one request per invoke, each with its own sampling
        parameters (vLLM's ``SamplingParams`` fields; ``max_tokens`` defaults to 1: one forward pass);
        ``tracer.iter[...]`` / ``tracer.all()`` count engine steps of the body's own request (step 0
        is its prefill); ``tracer.result``: one ``Completion`` per request, in invoke order

Every invoke's code sees only its own request's rows at every step (``rows.py``); values flow between
invokes, ``.save()``, edits, ``tracer.stop()``, ``tracer.cache()`` and ``module.skip()`` work as with
``LanguageModel``. vLLM keeps no autograd graph: ``.backward()`` in a trace raises and says to use
``LanguageModel``. Decoder layers return ``(hidden, residual)``; ``glassbox.vllm.residual_stream``
gives the Hugging Face residual stream (their sum).

``remote=True`` runs the block on the server's vLLM copy of the model (catalog ``engine = "vllm"``);
``tracer.result`` comes back as the same ``Completion`` objects. The block addresses modules by
vLLM's names inside itself; envoys taken outside it need the local module tree (an engine here).

Call hierarchy (one trace)::

    Tracer.__exit__ -> Interleaver.finish -> runner greenlet: VLLM._execute
        installed(...)                 routing wrappers on the model runner, for this trace
        Engine.run(requests)                 add requests, engine.step() until all are finished
            routed_forward -> RowRouter.begin_step     each invoke's rows in this step's slab
            model forward  -> wrapped modules meet the invoke bodies (Interleaver.boundary)
            routed_logits  -> model.logits, routed_sample -> model.samples
"""

from __future__ import annotations

import os
import random
from typing import Any

import torch

from ..batching import Rows
from ..envoy import Envoy, module_of
from ..errors import TraceStateError
from ..models.base import NNsight
from ..models.generation import GenerateTracer, reach_step
from ..models.hosted import HostedByName, load_config
from ..tracing import Tracer
from .engine import Completion, Engine
from .rows import RowRouter
from .seams import Passthrough, installed

# Envoy attributes that exist once the engine has started; reading one starts it.
_TREE = frozenset({"_module", "_by_name", "_children", "_path", "_display", "_parent", "_root", "_name",
                   "_slots"})


class _Request:
    """One invoke's prompt (token ids) and its own sampling parameters."""

    __slots__ = ("sampling", "token_ids")

    def __init__(self, token_ids: list[int], sampling: dict[str, Any]) -> None:
        self.token_ids = token_ids
        self.sampling = sampling


class VLLMTracer(GenerateTracer):
    """A trace over vLLM requests.

        with model.trace("The Eiffel Tower is in", temperature=0.0, max_tokens=3) as tracer:
            for step in tracer.iter[:]:
                tokens = model.samples.output.save()
    """

    def __init__(self, model: VLLM, args: tuple, kwargs: dict, *, remote: bool | str = False,
                 timeout: float | None = None, blocking: bool = True, method: str = "trace") -> None:
        self._method = method  # as written (remote=True finds the block by it; a server runs either)
        # With a prompt the keywords are its sampling parameters; without, defaults for every invoke.
        inputs, defaults = ((args, kwargs), {}) if args else (((), {}), dict(kwargs))
        Tracer.__init__(self, model, *inputs, call={"defaults": defaults}, remote=remote, timeout=timeout,
                        blocking=blocking, remote_call=dict(kwargs))

    def _reach_step(self, interleaver: Any, step: int) -> bool:
        """Steps are counted per request: step k of this body is the k-th engine step that holds
        its request (requests join and finish at different steps)."""
        root = self.model
        consumer = interleaver.current_consumer()

        def started() -> int:
            router = root.__dict__.get("_router")
            return router.steps(consumer) if router is not None else 0

        return reach_step(interleaver, root, step, started, whose="this request")


class VLLM(HostedByName, NNsight):
    """A vLLM engine you can trace.

        model = VLLM(path, dtype="float32")
        with model.trace("The capital of France is", temperature=0.0, max_tokens=3) as tracer:
            hidden = model.model.layers[5].output.save()
    """

    _narrow_min_ndim = 1  # no batch dimension: the first dimension of a slab is its tokens
    _no_gradients = (
        "gradients are not available with glassbox.VLLM: vLLM runs the model in inference mode and "
        "keeps no autograd graph. Use glassbox.LanguageModel on the same checkpoint for "
        "loss.backward() and .grad (the module names differ: Hugging Face's, not vLLM's)."
    )

    # Server co-tenant batching (server/jobs/cotenant.py): each invoke is a request of its own.
    _requests_per_invoke = True

    def __init__(self, model: str | os.PathLike, *, dtype: str = "auto", seed: int = 0,
                 max_model_len: int | None = None, kv_cache_gib: float = 1.0, tokenizer: Any = None,
                 dispatch: bool = False, remote_name: str | None = None, **llm_kwargs: Any) -> None:
        d = self.__dict__
        d["active"] = None
        d["_engine"] = None
        d["_router"] = None
        # what a remote block needs of the root before (or without) an engine: remote/client.py,
        # through envoy.root_of / path_of, which read the fields without starting the engine
        d["_root"], d["_path"] = self, ""
        # a server-only handle when only the server at CONFIG.HOST knows the name (models/hosted.py)
        d["_source"], server_said = self._locate(model, remote_name)
        if not d["_server_only"] and server_said is not None:  # a hub id, or an error saying what was tried
            load_config(d["_source"], {}, server_said)
        d["_engine_options"] = dict(dtype=dtype, seed=seed, max_model_len=max_model_len,
                                    kv_cache_gib=kv_cache_gib, **llm_kwargs)
        # Requests without a seed get one from here, so sampling never draws on (or moves) the
        # process's global RNG, and a VLLM built with the same seed samples the same tokens.
        d["_seeds"] = random.Random(seed)
        d["tokenizer"] = tokenizer if tokenizer is not None else _load_tokenizer(d["_source"])
        if dispatch:
            self._ensure_ready()

    # ---------------------------------------------------------------- the engine

    def _ensure_ready(self) -> None:
        d = self.__dict__
        if d["_engine"] is not None:
            return
        self._refuse_server_only(", and address its modules inside the block (model.model.layers[5]"
                                 ".output...): there is no module tree here")
        engine = Engine(d["_source"], **d["_engine_options"])
        Envoy.__init__(self, engine.model)
        d["_engine"] = engine
        for name in ("logits", "samples"):  # envoys over boundaries vLLM has no module for
            envoy = Envoy(Passthrough(), self, name)
            d["_by_name"][name] = envoy
            d[name] = envoy
        d["_children"] = tuple(d["_by_name"].values())

    def dispatch(self) -> VLLM:
        """Start the engine (and load the weights) now instead of at the first trace."""
        self._ensure_ready()
        return self

    @property
    def engine(self) -> Engine:
        self._ensure_ready()
        return self.__dict__["_engine"]

    @property
    def llm(self) -> Any:
        """The ``vllm.LLM`` (use it outside traces as usual)."""
        return self.engine.llm

    def __getattr__(self, name: str) -> Any:
        d = self.__dict__
        if d.get("_engine") is None:
            if name in _TREE or not name.startswith("_"):
                self._ensure_ready()
                return getattr(self, name)
            raise AttributeError(name)
        return Envoy.__getattr__(self, name)

    # ---------------------------------------------------------------- contexts

    def trace(self, *args: Any, remote: bool | str = False, timeout: float | None = None,
              blocking: bool = True, **kwargs: Any) -> VLLMTracer:
        """``model.trace(prompt, **sampling)`` (one request) or ``model.trace(**defaults)`` with
        ``tracer.invoke(prompt, **sampling)`` blocks (one request each)."""
        return VLLMTracer(self, args, kwargs, remote=remote, timeout=timeout, blocking=blocking)

    def generate(self, *args: Any, remote: bool | str = False, timeout: float | None = None,
                 blocking: bool = True, **kwargs: Any) -> VLLMTracer:
        """The same as ``trace`` (vLLM generates in every trace): the name LanguageModel users reach for."""
        return VLLMTracer(self, args, kwargs, remote=remote, timeout=timeout, blocking=blocking,
                          method="generate")

    def _run_remotely(self, method: str, body: Any, frame: Any, inputs: list, call: dict, *,
                      timeout: float | None, blocking: bool, local: bool = False) -> Any:
        from ..remote.client import RemoteRun

        return RemoteRun(self, method, body, frame, inputs, call, timeout=timeout, blocking=blocking,
                         local=local, result_form=_completions)

    def _wire_result(self, result: Any) -> list[dict] | None:
        """``tracer.result`` as a server sends it back (plain data; ``_completions`` undoes it)."""
        if not isinstance(result, list):
            return None
        return [dict(vars(c)) for c in result if isinstance(c, Completion)]

    # ---------------------------------------------------------------- inputs

    def _prepare(self, args: tuple, kwargs: dict) -> _Request:
        from vllm import SamplingParams

        if len(args) != 1:
            raise TypeError("give one prompt per trace or invoke (a string or a list of token ids); "
                            "for several requests use one tracer.invoke(...) each")
        SamplingParams(**kwargs)  # unknown or invalid sampling parameters fail here, at the user's line
        return _Request(self._token_ids(args[0]), dict(kwargs))

    def _token_ids(self, prompt: Any) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise TraceStateError("this model has no tokenizer: pass token ids, or tokenizer=...")
            return list(self.tokenizer(prompt)["input_ids"])
        if isinstance(prompt, torch.Tensor) and prompt.ndim == 1:
            prompt = prompt.tolist()
        if isinstance(prompt, dict) and "input_ids" in prompt:
            return self._token_ids(prompt["input_ids"])
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(t, int) for t in prompt):
            return list(prompt)
        raise TypeError(
            f"cannot use {type(prompt).__name__} as a vLLM prompt: pass a string or a list of token ids "
            "(one request per trace or invoke)"
        )

    def _single(self, prepared: _Request) -> tuple[tuple, dict]:
        return ([prepared],), {}

    def _batch(self, prepared: list[_Request], width: int = 0) -> tuple[tuple, dict, list[Rows]]:
        # Rows(i, i + 1) names request i; the row router turns it into real rows at every step.
        return (list(prepared),), {}, [Rows(i, i + 1) for i in range(len(prepared))]

    def _exact_rows(self, prepared: list[Any], spans: list[Rows], width: int = 0) -> list[Rows]:
        return spans  # nothing is padded: each request's rows are exactly its tokens

    # ---------------------------------------------------------------- running

    def _execute(self, args: tuple, kwargs: dict, defaults: dict | None = None,
                 **call: Any) -> list[Completion]:
        from vllm import SamplingParams

        requests: list[_Request] = args[0]
        engine: Engine = self.__dict__["_engine"]
        jobs = []
        for request in requests:
            sampling = {"max_tokens": 1, **(defaults or {}), **request.sampling}
            if sampling.get("seed") is None:
                sampling["seed"] = self._seeds.randrange(2**31)
            jobs.append((request.token_ids, SamplingParams(**sampling)))
        router = RowRouter(self.active)
        self.__dict__["_router"] = router
        try:
            with installed(engine, router, module_of(self.logits), module_of(self.samples)):
                return engine.run(jobs, on_added=router.bind)
        finally:
            self.__dict__["_router"] = None


def _completions(result: Any) -> Any:
    if isinstance(result, list) and all(isinstance(c, dict) for c in result):
        return [Completion(**c) for c in result]
    return result


def _load_tokenizer(source: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError):
        return None
