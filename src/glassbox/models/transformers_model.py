"""TransformersModel: any Hugging Face task through one class: text, vision, vision-language.

Offers:
    TransformersModel(id_or_dir_or_module, task=None, automodel=None, tokenizer=None,
                      processor=None, image_processor=None, peft=None, **LanguageModel options)
        ``.task`` (see tasks.TASKS), ``.tokenizer``, ``.processor``, ``.image_processor``;
        ``.trace(...)``; ``.generate(...)`` for models that generate (causal LM, seq2seq,
        vision-language). Everything else (lazy meta load, ``dispatch``, ``rename``,
        ``peft=``, ``model.output`` indexing like its first field) is LanguageModel's.
    VisionLanguageModel(...)    a TransformersModel with ``task="image-text-to-text"``

Inputs, per trace or per invoke (several invokes are one batch):
    text and token ids          as for LanguageModel (tokenised by ``.tokenizer``)
    ``text=..., images=[...]``  through ``.processor`` (a VLM's <image> prompt, CLIP's pair)
    an image or list of images  through ``.image_processor`` (else ``.processor``)
    a tensor                    the model's main input (``pixel_values`` for ViT/CLIP vision)
    a dict / BatchEncoding / BatchFeature   ``input_ids`` (+ ``attention_mask``) become token
                                rows; every other tensor is per-invoke data (``pixel_values``,
                                ``decoder_input_ids``, ...), concatenated on dim 0 across invokes
    keyword tensors             per-invoke data too; the tokenizer's keywords (``truncation=``,
                                ``padding=``...: tokenizing.py) go to the tokenizer, or to the
                                processor with ``text=`` / ``images=``; the rest to forward as they are

Decisions:
  * A subclass of LanguageModel: loading, tokenised batching, generation and ``peft=`` are
    its code; this class picks the Auto class by task (``_pick_automodel``), adds image and
    processor inputs, and pads on the side the model needs (tasks.pads_left): prompts are
    left-padded first (LanguageModel's batching) and right-aligned for encoders.
    ``TransformersModel(x, task="causal-lm")`` behaves exactly as ``LanguageModel(x)``.
  * The task is given, or read off the checkpoint (``config.architectures``) or off the
    module's class: it decides the Auto class only; inputs are handled by what they are.
  * Per-invoke tensors are batched by concatenation, so invokes of one trace must give the
    same kinds of input, and each such tensor as many rows as the invoke has prompts (one
    image per prompt); otherwise a ValueError says so. ``token_type_ids`` of all zeros (the
    default) are dropped, so BERT tokenizer output pads like plain text.
  * seq2seq: ``generate`` works as for a causal LM; a trace without ``decoder_input_ids``
    runs the decoder on the start token, as generate's first step does. The encoder runs
    before the decoder, so read ``model.encoder`` modules before ``model.decoder`` ones.
  * Remote traces serve causal language models only (a server hosts LanguageModels).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import torch

from ..batching import Rows
from ..envoy import module_of
from ..errors import TraceStateError
from . import tasks, tokenizing
from .generation import call_through
from .language import LanguageModel

_MEDIA = ("text", "images")  # keywords that go through the processor
_TOKENS = ("input_ids", "attention_mask")
_DECODER_INPUTS = frozenset({"decoder_input_ids", "decoder_inputs_embeds", "labels"})
_PROCESSOR_TASKS = frozenset({"image-text-to-text", "zero-shot-image-classification"})


class _Input:
    """One invoke's input: token rows (None: no text), per-row tensors, shared forward kwargs."""

    __slots__ = ("count", "kwargs", "rows", "tensors", "width")

    def __init__(self, rows: list[list[int]] | None, tensors: dict[str, torch.Tensor],
                 kwargs: dict[str, Any], width: int = 0) -> None:
        if rows is None and not tensors:
            raise TypeError("no input given: pass text, token ids, images, a tensor, or a processor's output")
        self.rows = rows
        self.tensors = tensors
        self.kwargs = kwargs
        self.width = width  # the width its tokenizer options padded its rows to (0: none)
        self.count = len(rows) if rows is not None else next(iter(tensors.values())).shape[0]


class TransformersModel(LanguageModel):
    """A Hugging Face model of any task you can trace.

        model = TransformersModel("google/vit-base-patch16-224", task="image-classification")
        with model.trace(image):
            cls = model.vit.layers[5].output[:, 0].save()
    """

    def __init__(
        self,
        model: Any,
        *,
        task: str | None = None,
        automodel: Any = None,
        tokenizer: Any = None,
        processor: Any = None,
        image_processor: Any = None,
        **options: Any,
    ) -> None:
        d = self.__dict__
        d["task"] = tasks.canonical(task) if task is not None else None
        if automodel is None and task is not None:
            automodel = tasks.automodel(task)
        if tokenizer is None:
            tokenizer = getattr(processor, "tokenizer", None)
        super().__init__(model, tokenizer=tokenizer, automodel=automodel, **options)
        module = module_of(self)
        if d["task"] is None:  # a built module, or automodel= without task=
            d["task"] = tasks.infer(module.config, type(module).__name__)
        source = None if isinstance(model, torch.nn.Module) else self._source
        if processor is None and d["task"] in _PROCESSOR_TASKS:
            processor = _preprocessor("AutoProcessor", source)
        if image_processor is None:
            image_processor = getattr(processor, "image_processor", None)
        if image_processor is None and getattr(module, "main_input_name", None) == "pixel_values":
            image_processor = _preprocessor("AutoImageProcessor", source)
        d["processor"] = processor
        d["image_processor"] = image_processor
        d["_left"] = tasks.pads_left(module)
        d["_seq2seq"] = bool(getattr(module.config, "is_encoder_decoder", False)) and module.can_generate()

    def _pick_automodel(self, config: Any) -> Any:
        if self.__dict__["task"] is None:
            self.__dict__["task"] = tasks.infer(config)
        return tasks.automodel(self.__dict__["task"])

    # ---------------------------------------------------------------- contexts

    @call_through  # LanguageModel.generate looks past this frame to see whether the caller has `with`
    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """As LanguageModel.generate; ``text=`` / ``images=`` go through the processor."""
        media = {key: kwargs.pop(key) for key in _MEDIA if key in kwargs}
        if media:  # the tokenizer's keywords go to the processor, max_length to generate (and to the
            options = tokenizing.take_options(kwargs)  # processor only with truncation= or padding=)
            shared = {key: options[key] for key in tokenizing.GENERATE_TOO if key in options}
            kwargs.update(shared)
            if not options.keys() & {"truncation", "padding"}:
                options = {key: value for key, value in options.items() if key not in shared}
            args = (self._encode(*args, options=options, **media),)
        return super().generate(*args, **kwargs)

    def _run_remotely(self, method: str, body: Any, frame: Any, inputs: list, call: dict, *,
                      timeout: float | None, blocking: bool, local: bool = False) -> Any:
        if self.task != "causal-lm":
            raise TraceStateError(
                f"remote execution serves causal language models (glassbox.LanguageModel); this "
                f"model's task is {self.task!r}: trace it locally"
            )
        return super()._run_remotely(method, body, frame, inputs, call, timeout=timeout,
                                     blocking=blocking, local=local)

    # ---------------------------------------------------------------- inputs

    def _encode(self, *args: Any, text: Any = None, images: Any = None, options: dict | None = None) -> Any:
        """Text and/or images through the processor (images alone: the image processor); ``options``:
        the tokenizer's keywords, for the processor's text."""
        if args:
            if text is not None or len(args) > 1:
                raise TypeError("give the text once: positionally or as text=")
            text = args[0]
        if text is None and self.image_processor is not None:
            return self.image_processor(images, return_tensors="pt")
        if self.processor is None:
            raise TraceStateError(
                "this model has no processor for text= / images=: pass processor=... (or "
                "image_processor=...) when creating it, or give the processed tensors"
            )
        padding = {} if text is None else {"padding": True}
        options = {k: v for k, v in (options or {}).items() if not k.startswith("return_")}
        return self.processor(text=text, images=images, return_tensors="pt", **{**padding, **options})

    def _holds_input(self, kwargs: dict) -> bool:
        # text= / images= for the processor, or tensors (input_ids=, pixel_values=...): an input
        return any(key in _MEDIA or _is_data(value) for key, value in kwargs.items())

    def _prepare(self, args: tuple, kwargs: dict) -> _Input:
        kwargs = dict(kwargs)
        options = tokenizing.take_options(kwargs)
        media = {key: kwargs.pop(key) for key in _MEDIA if key in kwargs}
        tensors = {key: kwargs.pop(key) for key in list(kwargs) if _is_data(kwargs[key])}
        if media:
            data: Any = self._encode(*args, options=options, **media)
            options = {}
        elif len(args) > 1:
            raise TypeError("give one input per trace or invoke (text, images, a tensor, a dict...)")
        elif args:
            data = args[0]
        else:  # keyword tensors only: input_ids=..., pixel_values=...
            data, tensors = tensors, {}
        if _is_images(data):
            data = self._encode(images=data)
        main = getattr(module_of(self), "main_input_name", "input_ids")
        if isinstance(data, torch.Tensor) and main != "input_ids":
            data = {main: data}
        if not isinstance(data, Mapping):
            rows, width = self._tokens(data, options)
            return _Input(rows, tensors, kwargs, width)
        rows, width = None, 0
        if data.get("input_ids") is not None:
            rows, width = self._tokens({key: data.get(key) for key in _TOKENS}, options)
        elif options:
            raise TypeError(f"{', '.join(sorted(options))}: tokenizer options, for text or token ids; this "
                            "input has neither")
        for key, value in data.items():
            if (rows is not None and key in _TOKENS) or (key == "token_type_ids" and _all_zero(value)):
                continue  # token rows above; all-zero token types are the default (and would need padding)
            if _is_data(value):
                tensors[key] = value
            elif value is not None:
                kwargs.setdefault(key, value)
        return _Input(rows, tensors, kwargs, width)

    def _batch(self, prepared: list[_Input], width: int = 0) -> tuple[tuple, dict, list[Rows]]:
        first = prepared[0]
        for item in prepared[1:]:
            if (item.rows is None) != (first.rows is None) or item.tensors.keys() != first.tensors.keys():
                raise ValueError(
                    "all invokes of one trace must give the same kinds of input (text or not, and "
                    f"the same tensors: {sorted(first.tensors)} vs {sorted(item.tensors)})"
                )
        if len(prepared) > 1:
            for item in prepared:
                for key, value in item.tensors.items():
                    if value.shape[0] != item.count:
                        raise ValueError(
                            f"cannot batch this invoke: its {key} has {value.shape[0]} rows for "
                            f"{item.count} prompt(s); give one image per prompt, or trace it alone"
                        )
        if first.rows is not None:
            args, kwargs, spans = super()._batch(prepared, width)
            if not self._left:
                kwargs["input_ids"], kwargs["attention_mask"] = _right_aligned(
                    kwargs["input_ids"], kwargs["attention_mask"]
                )
        else:
            if any(item.kwargs.keys() != first.kwargs.keys() for item in prepared):
                raise ValueError("all invokes of one trace must pass the same keyword arguments")
            args, kwargs, spans, start = (), dict(first.kwargs), [], 0
            for item in prepared:
                spans.append(Rows(start, start + item.count))
                start += item.count
        for key in first.tensors:
            try:
                kwargs[key] = torch.cat([item.tensors[key] for item in prepared])
            except RuntimeError as exc:
                raise ValueError(f"cannot batch the invokes' {key}: {exc}; trace them one by one") from exc
        return args, kwargs, spans

    def _exact_rows(self, prepared: list[_Input], spans: list[Rows], width: int = 0) -> list[Rows]:
        if prepared[0].rows is None:
            return spans  # no text, no padding
        if not self._left:
            raise TraceStateError(
                "independent bodies cut their leading padding; this model pads on the right "
                "(an encoder): run its inputs as invokes of one trace, or one trace each"
            )
        return super()._exact_rows(prepared, spans, width)

    def _execute(self, args: tuple, kwargs: dict, **call: Any) -> Any:
        if self._seq2seq and call.get("generate") is None and not kwargs.keys() & _DECODER_INPUTS:
            config = module_of(self).config
            start = config.decoder_start_token_id
            if start is None:
                start = module_of(self).generation_config.decoder_start_token_id
            rows = next(value.shape[0] for value in kwargs.values() if _is_data(value))
            kwargs = {**kwargs, "decoder_input_ids": torch.full((rows, 1), int(start), dtype=torch.long)}
        return super()._execute(args, kwargs, **call)


class VisionLanguageModel(TransformersModel):
    """A vision-language model (``task="image-text-to-text"``): prompts with images.

        model = VisionLanguageModel(path)    # or a built module plus processor=...
        with model.generate("<image> What is this?", images=[image], max_new_tokens=5) as tracer:
            ids = tracer.result.save()
    """

    def __init__(self, model: Any, **options: Any) -> None:
        options.setdefault("task", "image-text-to-text")
        super().__init__(model, **options)


def _is_data(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.ndim > 0


def _all_zero(value: Any) -> bool:
    return value is not None and not torch.as_tensor(value).any()


def _is_images(data: Any) -> bool:
    pil = sys.modules.get("PIL.Image")  # images come as PIL objects only if PIL is already loaded
    if pil is None:
        return False
    items = data if isinstance(data, (list, tuple)) and data else [data]
    return all(isinstance(item, pil.Image) for item in items)


def _right_aligned(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded rows moved to the left edge (padding on the right)."""
    width = ids.shape[1]
    index = (torch.arange(width) + (mask == 0).sum(-1, keepdim=True)) % width
    return ids.gather(1, index), mask.gather(1, index)


def _preprocessor(auto_class: str, source: str | None) -> Any:
    if not source:
        return None
    import transformers

    try:
        return getattr(transformers, auto_class).from_pretrained(source)
    except (OSError, ValueError, TypeError):
        return None
