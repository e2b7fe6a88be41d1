"""Hugging Face tasks: which Auto class builds a model, and what a given model is for.

Offers:
    TASKS                    the task names ``TransformersModel(task=...)`` takes (canonical ones)
    canonical(task)          a task name, pipeline spellings included ("text-generation",
                             "fill-mask", ...), as its canonical name; ValueError when unknown
    automodel(task)          the ``transformers`` Auto class for a task
    infer(config, arch=None) the task of a checkpoint's config (or of a built model's class
                             name ``arch``): the first task whose Auto class maps that config
                             type to that class; "feature-extraction" (AutoModel) when none does
    pads_left(module)        whether batched prompts are left-padded: a decoder-only model
                             that generates; encoders and encoder-decoders pad on the right

Decisions:
  * Task names are the short ones of the brief ("causal-lm", "seq2seq", ...); the pipeline
    names nnsight passes to ``transformers.pipeline`` are accepted as aliases.
  * A task is inferred from the Auto mappings themselves (exact class names), so BERT's
    several heads, Llava vs T5 (both ``...ForConditionalGeneration``) and CLIPModel come
    out right without a suffix table.
  * Padding follows the model, not the task (as in nnsight): left for decoders so
    ``[:, -1]`` is the last real token, right for encoders (BERT classifies position 0,
    CLIP pools the first end-of-text token, which a left pad would be).
"""

from __future__ import annotations

from typing import Any

import torch

# canonical task -> (Auto class, the modeling_auto mapping of config types to class names)
_TABLE = {
    "causal-lm": ("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    "seq2seq": ("AutoModelForSeq2SeqLM", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"),
    "masked-lm": ("AutoModelForMaskedLM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES"),
    "sequence-classification": ("AutoModelForSequenceClassification",
                                "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
    "token-classification": ("AutoModelForTokenClassification",
                             "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"),
    "question-answering": ("AutoModelForQuestionAnswering", "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES"),
    "image-classification": ("AutoModelForImageClassification",
                             "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES"),
    "image-text-to-text": ("AutoModelForImageTextToText", "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES"),
    "zero-shot-image-classification": ("AutoModelForZeroShotImageClassification",
                                       "MODEL_FOR_ZERO_SHOT_IMAGE_CLASSIFICATION_MAPPING_NAMES"),
    "feature-extraction": ("AutoModel", "MODEL_MAPPING_NAMES"),  # last: the bare model, no head
}
TASKS = tuple(_TABLE)

_ALIASES = {
    "text-generation": "causal-lm",
    "fill-mask": "masked-lm",
    "seq2seq-lm": "seq2seq",
    "text2text-generation": "seq2seq",
    "summarization": "seq2seq",
    "translation": "seq2seq",
    "text-classification": "sequence-classification",
    "sentiment-analysis": "sequence-classification",
    "ner": "token-classification",
    "vision-language": "image-text-to-text",
    "image-feature-extraction": "feature-extraction",
}


def canonical(task: str) -> str:
    name = _ALIASES.get(task, task)
    if name not in _TABLE:
        raise ValueError(
            f"unknown task {task!r}: use one of {', '.join(TASKS)} (or pass automodel=AutoModelForX)"
        )
    return name


def automodel(task: str) -> Any:
    import transformers

    return getattr(transformers, _TABLE[canonical(task)][0])


def infer(config: Any, arch: str | None = None) -> str:
    """The task whose Auto class builds ``arch`` (default: the checkpoint's first architecture)
    from ``config``."""
    from transformers.models.auto import modeling_auto

    if arch is None:
        arch = next(iter(getattr(config, "architectures", None) or []), None)
    model_type = getattr(config, "model_type", None)
    if arch is not None:
        for task, (_, mapping) in _TABLE.items():
            names = getattr(modeling_auto, mapping).get(model_type)
            if arch == names or (isinstance(names, (list, tuple)) and arch in names):
                return task
    return "feature-extraction"


def pads_left(module: torch.nn.Module) -> bool:
    config = getattr(module, "config", None)
    generates = getattr(module, "can_generate", lambda: False)()
    return bool(generates) and not getattr(config, "is_encoder_decoder", False)
