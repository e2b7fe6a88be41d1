"""LanguageModel: Hugging Face causal LMs (and encoders) with tokenised batching.

Offers:
    LanguageModel(id_or_dir, device_map=, device=, dtype=, dispatch=False, attn_implementation=,
                  tokenizer=, tokenizer_kwargs=, automodel=, rename=, peft=, **hf_kwargs)
        lazy: the module tree is built on the meta device (shapes only), real
        weights load at the first trace; ``.tokenizer``, ``.config``;
        ``.trace(...)`` and ``.generate(...)``. ``device="cuda:0"`` (nnsight's form) puts the whole
        model on one device: ``device_map=`` that device (a built module is moved there at once);
        ``tokenizer_kwargs`` are set as attributes of the tokenizer, as nnsight 0.8 does.

Construction does no network I/O of glassbox's own unless the name can only be resolved
remotely (hosted.py has the rules): a folder, or a hub id whose config is in the local Hugging
Face cache, loads with no request to anyone. Any other name is first asked of the glassbox server
at ``CONFIG.HOST``, with a line on stderr saying so: a name it serves becomes a server-only handle
(config and tokenizer here, weights there: ``remote=True`` traces only), and a second line says
that. A name it does not serve (or no server at all) is tried as a hub id; when that fails too,
the OSError gives both answers. Other server failures are raised, never swallowed.

Inputs (per trace or per invoke): a string, a list of strings, chat messages (one conversation
``[{"role": "user", "content": ...}]`` or a list of them: the tokenizer's chat template applies),
token ids (list, list of lists, 1-D or 2-D tensor), or a dict / BatchEncoding with ``input_ids``
(and ``attention_mask``). The tokenizer's keywords given with an input (``truncation=True,
max_length=8``, ``padding="max_length"``, ``add_special_tokens=False``...) go to the tokenizer,
the rest to forward / generate: tokenizing.py has the split and what each input form does with
them. All invokes are left-padded into one batch with an attention mask and explicit position ids,
so each prompt's values equal those of the prompt run alone, and ``[:, -1]`` is always the last
real token.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any

import torch
from torch._guards import detect_fake_mode

from ..batching import Rows
from ..editing import refuse_remote
from ..envoy import Envoy, display_of, module_of, name_of, parent_of, rebind
from ..errors import TraceStateError
from . import adapters, attention, tokenizing
from .base import NNsight
from .generation import GenerateTracer, Generator, GeneratorEnvoy, called_as_with
from .hosted import HostedByName, load_config
from .outputs import tensor_like


class _Prompt:
    """One invoke's token rows (unpadded), the width its tokenizer options padded them to (0: none),
    plus extra forward kwargs."""

    __slots__ = ("kwargs", "rows", "width")

    def __init__(self, rows: list[list[int]], kwargs: dict[str, Any], width: int = 0) -> None:
        self.rows = rows
        self.kwargs = kwargs
        self.width = width


class LanguageModel(HostedByName, NNsight):
    """A Hugging Face language model you can trace.

        model = LanguageModel("path/to/SmolLM2-135M")
        with model.trace("The capital of France is"):
            logits = model.output.save()
    """

    _narrow_min_ndim = 2  # 1-D tensors (cache_position) are shared, not per row

    def __init__(
        self,
        model: str | os.PathLike | torch.nn.Module,
        *,
        tokenizer: Any = None,
        tokenizer_kwargs: dict | None = None,
        device_map: Any = None,
        device: Any = None,
        dtype: Any = None,
        dispatch: bool = False,
        attn_implementation: str | None = None,
        automodel: Any = None,
        remote_name: str | None = None,
        rename: dict | None = None,
        peft: Any = None,
        **hf_kwargs: Any,
    ) -> None:
        if attn_implementation == attention.ATTN_IMPLEMENTATION:
            attention.register()
        if device is not None:
            device_map = _device_map_of(device, device_map)
        self.__dict__["_loaded"] = isinstance(model, torch.nn.Module)
        if isinstance(model, torch.nn.Module):
            if device is not None:  # built already: placed now
                model = model.to(device_map)
            module, source = model, getattr(getattr(model, "config", None), "name_or_path", None)
            self.__dict__["_remote_as"], self.__dict__["_server_only"] = remote_name, False
        else:  # a server-only handle when only the server at CONFIG.HOST knows the name (hosted.py)
            source, server_said = self._locate(model, remote_name, hf_kwargs)
            config = load_config(source, hf_kwargs, server_said)
            automodel = automodel or self._pick_automodel(config)
            module = _meta_model(automodel, config, attn_implementation, dtype)
        if peft is not None:  # its modules join the tree; a meta model gets no weights (see adapters.py)
            adapters.attach(module, peft, weights=self.__dict__["_loaded"])
        if attn_implementation == attention.ATTN_IMPLEMENTATION:
            attention.add_probe_modules(module)
        super().__init__(module, rename=rename)
        d = self.__dict__
        d["_source"] = source
        d["_load"] = dict(
            automodel=automodel, device_map=device_map, dtype=dtype,
            attn_implementation=attn_implementation, hf_kwargs=hf_kwargs, peft=peft,
        )
        d["tokenizer"] = tokenizer if tokenizer is not None else _load_tokenizer(source, hf_kwargs)
        for key, value in (tokenizer_kwargs or {}).items():  # nnsight 0.8: settings of the tokenizer
            setattr(d["tokenizer"], key, value)
        # outside the module tree (the HF model is not changed): generate() calls it with its result
        d["_generator"] = GeneratorEnvoy(Generator(), self, "generator")
        if dispatch:
            self._ensure_ready()

    # ---------------------------------------------------------------- loading

    def _ensure_ready(self) -> None:
        if self.__dict__["_loaded"] or detect_fake_mode() is not None:  # model.scan: no weights needed
            return
        self._refuse_server_only()
        opts = self._load
        print(f"[glassbox] loading weights from {self._source} ...", file=sys.stderr, flush=True)
        kwargs = dict(opts["hf_kwargs"])
        if opts["device_map"] is not None:
            kwargs["device_map"] = opts["device_map"]
        if opts["dtype"] is not None:
            kwargs["dtype"] = opts["dtype"]
        if opts["attn_implementation"] is not None:
            kwargs["attn_implementation"] = opts["attn_implementation"]
        try:
            real = opts["automodel"].from_pretrained(self._source, **kwargs)
        except (OSError, ValueError) as exc:
            raise OSError(
                f"could not load weights for {self._source!r}: {exc}. Give a local folder with "
                "config.json and *.safetensors, or a hub id reachable from this machine."
            ) from exc
        real.eval()
        if opts["peft"] is not None:
            adapters.attach(real, opts["peft"])
        if opts["attn_implementation"] == attention.ATTN_IMPLEMENTATION:
            attention.add_probe_modules(real)
        rebind(self, real)  # every envoy onto its real submodule (the meta ones go)
        self.__dict__["_loaded"] = True

    def _pick_automodel(self, config: Any) -> Any:
        """The Auto class an id or folder loads with (TransformersModel picks by task)."""
        return _automodel_for(config)

    def dispatch(self) -> LanguageModel:
        """Load the real weights now instead of at the first trace."""
        self._ensure_ready()
        return self

    @property
    def config(self) -> Any:
        return module_of(self).config

    @property
    def generator(self) -> Envoy:
        """Inside ``model.generate(...)``: ``model.generator.output`` is what ``generate``
        returns (the ids, prompt included), ``model.generator.streamer.output`` the new
        token of one step (``[batch]``)."""
        return self.__dict__["_generator"]

    # ---------------------------------------------------------------- contexts

    def generate(
        self, *args: Any, remote: bool | str = False, timeout: float | None = None, blocking: bool = True,
        **kwargs: Any,
    ) -> Any:
        """``with model.generate(prompt, max_new_tokens=N) as tracer:`` — a trace
        around Hugging Face ``generate``; each forward call is one step. Called
        without ``with`` it just generates and returns the ids."""
        if self.active is not None:
            raise TraceStateError(
                "model.generate() opens its own trace and cannot run inside another one. "
                "Write:\n    with model.generate(prompt, max_new_tokens=N) as tracer:\n"
                "        model.<layer>.output[:, -1] *= 1.5   # step 0; use tracer.iter[...] or "
                "tracer.all() for more steps\n    tokens = tracer.result"
            )
        tracer = GenerateTracer(self, args, kwargs, remote=remote, timeout=timeout, blocking=blocking,
                                prompt_options=tokenizing.OPTION_KEYS, shared=tokenizing.GENERATE_TOO)
        if remote or called_as_with(sys._getframe(1)):
            return tracer
        return tracer._run_now()

    def _run_remotely(self, method: str, body: Any, frame: Any, inputs: list, call: dict, *,
                      timeout: float | None, blocking: bool, local: bool = False) -> Any:
        from ..remote.client import RemoteRun

        refuse_remote(self)  # edits run locally only
        if self.__dict__["_load"].get("peft") is not None:  # a server has the base model, not this adapter
            raise TraceStateError(
                "this model has a peft= adapter, which runs locally only: a server hosts the base model "
                "without it. Trace it locally, or serve a checkpoint with the adapter merged in"
            )
        return RemoteRun(self, method, body, frame, inputs, call, timeout=timeout, blocking=blocking,
                         local=local)

    # ---------------------------------------------------------------- inputs

    def _holds_input(self, kwargs: dict) -> bool:
        return "input_ids" in kwargs or "inputs_embeds" in kwargs

    def _prepare(self, args: tuple, kwargs: dict) -> _Prompt:
        kwargs = dict(kwargs)
        options = tokenizing.take_options(kwargs)  # the rest go to forward / generate
        if args:
            data, rest = args[0], args[1:]
            if rest:
                raise TypeError("give one input per trace or invoke (a string, a list of strings, ids...)")
        elif "input_ids" in kwargs:
            mask = kwargs.pop("attention_mask", None)
            data = {"input_ids": kwargs.pop("input_ids"), "attention_mask": mask}
        else:
            raise TypeError("no input given: pass a string, a list of strings, or token ids")
        rows, width = self._tokens(data, options)
        return _Prompt(rows, kwargs, width)

    def _tokens(self, data: Any, options: dict) -> tokenizing.Encoded:
        """An input's token rows and padded width: text and chat messages through the tokenizer with
        ``options``, token ids as given (truncated / padded as ``options`` say)."""
        if tokenizing.is_text(data) or tokenizing.as_chats(data) is not None:
            return tokenizing.encode_text(self.tokenizer, data, options)
        rows, width = tokenizing.encode_ids(self.tokenizer, self._rows(data), options)
        return tokenizing.Encoded(rows, max(width, _padded_width(data)))

    def _rows(self, data: Any) -> list[list[int]]:
        if isinstance(data, str):
            return [self._tokenize(data)]
        if isinstance(data, Mapping):
            ids, mask = data.get("input_ids"), data.get("attention_mask")
            if ids is None:
                raise TypeError("a dict input needs 'input_ids'")
            rows = self._rows(ids)
            if mask is not None:
                masks = self._rows(mask)
                rows = [[t for t, m in zip(r, mk) if m] for r, mk in zip(rows, masks)]
            return rows
        if isinstance(data, torch.Tensor):
            if data.ndim == 1:
                return [data.tolist()]
            if data.ndim == 2:
                return data.tolist()
            raise TypeError(f"token ids must be 1-D or 2-D, got shape {tuple(data.shape)}")
        if isinstance(data, (list, tuple)):
            if not data:
                raise TypeError("empty input list")
            if all(isinstance(item, str) for item in data):
                return [self._tokenize(item) for item in data]
            if all(isinstance(item, int) for item in data):
                return [list(data)]
            if all(isinstance(item, (list, tuple, torch.Tensor)) for item in data):
                return [row for item in data for row in self._rows(item)]
        raise TypeError(
            f"cannot use {type(data).__name__} as model input: pass a string, a list of strings, "
            "token ids (list or tensor), or a dict with input_ids"
        )

    def _tokenize(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise TraceStateError("this model has no tokenizer: pass token ids, or tokenizer=...")
        return self.tokenizer(text)["input_ids"]

    def _batch(self, prepared: list[_Prompt], width: int = 0) -> tuple[tuple, dict, list[Rows]]:
        rows: list[list[int]] = []
        spans, start = [], 0
        for prompt in prepared:
            rows.extend(prompt.rows)
            spans.append(Rows(start, start + len(prompt.rows)))
            start += len(prompt.rows)
        # at least ``width`` (see cotenant._groups) and each prompt's own padded width
        width = max(width, *(len(r) for r in rows), *(prompt.width for prompt in prepared))
        pad = self._pad_id()
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
        extra = prepared[0].kwargs
        for prompt in prepared[1:]:
            if prompt.kwargs.keys() != extra.keys():
                raise ValueError("all invokes of one trace must pass the same keyword arguments")
        kwargs = {"input_ids": ids, "attention_mask": mask, **extra}
        return (), kwargs, spans

    def _exact_rows(self, prepared: list[_Prompt], spans: list[Rows], width: int = 0) -> list[Rows]:
        """``spans`` with the padding each prompt did not have alone marked to be cut."""
        own = [max(prompt.width, *(len(r) for r in prompt.rows)) for prompt in prepared]
        width = max(width, *own)
        trimmed = []
        for span, alone in zip(spans, own):
            trim = width - alone
            trimmed.append(Rows(span.start, span.stop, trim, width) if trim else span)
        return trimmed

    def _single(self, prepared: _Prompt) -> tuple[tuple, dict]:
        args, kwargs, _ = self._batch([prepared])
        return args, kwargs

    def _pad_id(self) -> int:
        tok = self.tokenizer
        for candidate in (getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None)):
            if candidate is not None:
                return int(candidate)
        return 0

    def _execute(self, args: tuple, kwargs: dict, **call: Any) -> Any:
        module = module_of(self)
        device = getattr(module, "device", None)
        if device is not None and device.type != "meta":
            kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        generate = call.get("generate")
        if generate is not None:
            generate = dict(generate)
            generate.setdefault("pad_token_id", self._pad_id())
            generator = module_of(self.__dict__["_generator"])
            config = getattr(module, "generation_config", None)
            beams = generate.get("num_beams", getattr(config, "num_beams", 1))
            if (beams or 1) == 1:  # transformers refuses a streamer with beam search
                generate["streamer"] = generator.streamer.attach(generate.get("streamer"))
            return generator(module.generate(**kwargs, **generate))
        mask = kwargs.get("attention_mask")  # None: a vision model's pixels
        accepts = self.__dict__.get("_accepts_positions")
        if accepts is None or accepts[0] is not module:  # inspect.signature costs ~25 µs: once per model
            accepts = self.__dict__["_accepts_positions"] = (module, _accepts(module, "position_ids"))
        if mask is not None and "position_ids" not in kwargs and accepts[1]:
            kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        return module(**kwargs)

    def _missed_hint(self, envoy: Any) -> str | None:
        if name_of(envoy) == "attn_dropout":
            return (
                "In transformers 5 attention applies dropout as a function, so this module never "
                "runs. To read or edit attention probabilities load the model with "
                "LanguageModel(..., attn_implementation='glassbox') and use "
                f"{display_of(parent_of(envoy))}.attn_probs.output ([batch, heads, query, key])."
            )
        return None

    # ---------------------------------------------------------------- values

    @property
    def output(self) -> Any:
        """The model's output. Index it like its first field (the logits for a
        causal LM): ``model.output[0, -1]``; or use fields: ``model.output.logits``."""
        return tensor_like(NNsight.output.fget(self))

    @output.setter
    def output(self, value: Any) -> None:
        NNsight.output.fset(self, value)


def _padded_width(data: Any) -> int:
    """The width an encoding was padded to (its attention mask has zeros), kept as tokenizing keeps
    the padding its options ask for; 0 for anything else."""
    mask = data.get("attention_mask") if isinstance(data, Mapping) else None
    if mask is None:
        return 0
    try:
        mask = torch.as_tensor(mask)
    except (TypeError, ValueError):  # ragged lists: not padded
        return 0
    if mask.ndim not in (1, 2):
        return 0
    try:
        padded = not bool(mask.all())
    except RuntimeError:  # a fake tensor (model.scan): its values are unknown, so it reads as unpadded
        return 0
    return int(mask.shape[-1]) if padded else 0


def _device_map_of(device: Any, device_map: Any) -> Any:
    """nnsight's ``device=`` (the pipeline's: a device, its name, or a CUDA index; -1 the CPU) as the
    ``device_map`` that puts the whole model there."""
    if device_map is not None:
        raise ValueError("pass device= or device_map=, not both: device='cuda:0' is device_map='cuda:0' "
                         "(the whole model on one device)")
    if isinstance(device, int) and not isinstance(device, bool):
        return torch.device("cpu") if device < 0 else torch.device("cuda", device)
    return torch.device(device)  # a name torch does not know raises its own error here


def _accepts(module: torch.nn.Module, name: str) -> bool:
    import inspect

    try:
        return name in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def _automodel_for(config: Any) -> Any:
    from transformers import AutoModel, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    architectures = getattr(config, "architectures", None) or []
    if architectures:  # what the checkpoint was saved as decides (BERT also has an LM head class)
        causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
        return AutoModelForCausalLM if causal else AutoModel
    return AutoModelForCausalLM if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING else AutoModel


_TOKENIZER_KEYS = {"revision", "token", "cache_dir", "local_files_only"}


def _meta_model(automodel: Any, config: Any, attn: str | None, dtype: Any) -> torch.nn.Module:
    kwargs: dict[str, Any] = {}
    if attn is not None:
        kwargs["attn_implementation"] = attn
    if dtype is not None and dtype != "auto":
        kwargs["dtype"] = dtype
    with torch.device("meta"):
        return automodel.from_config(config, **kwargs).eval()


def _load_tokenizer(source: str | None, hf_kwargs: dict) -> Any:
    if source is None:
        return None
    from transformers import AutoTokenizer

    # where to find the files (a hub id in a given cache, offline...), as for the config
    finding = {k: v for k, v in hf_kwargs.items() if k in _TOKENIZER_KEYS}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **finding)
    except (OSError, ValueError, TypeError):
        return None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
