"""Tokenizer options and chat messages: what a LanguageModel's trace, invoke or generate hands its tokenizer.

Offers:
    take_options(kwargs) -> dict    pop the keyword arguments that are the tokenizer's (OPTION_KEYS)
                                    off ``kwargs``; what is left goes to forward / generate
    OPTION_KEYS                     those names; ``max_length`` is also generate's (GENERATE_TOO)
    as_chats(data) -> list | None   chat messages as conversations: one conversation (a list of
                                    ``{"role", "content"}`` dicts) or a list of them; None: not chat
    is_text(data) -> bool           a string, or a (nested) list of strings
    encode_text(tokenizer, data, options) -> Encoded    text or chat messages through the tokenizer
    encode_ids(tokenizer, rows, options) -> Encoded     token ids as given, truncated and padded as
                                    the tokenizer would truncate and pad them
    Encoded                         ``(rows, width)``: each row's real tokens (no padding) and the
                                    width the options padded them to (0: not padded)

Decisions (nnsight 0.8.1 sends an invoke's keywords through the text-generation pipeline's
``_sanitize_parameters``: ``add_special_tokens``, ``padding``, ``truncation``, ``max_length``,
``tokenizer_encode_kwargs``, ``prefix``, ``tools``, ``documents`` and ``continue_final_message``
reach the tokenizer, everything else the model; this is that split):
  * Every keyword of the tokenizer's own ``__call__`` is an option too (``pad_to_multiple_of``,
    ``stride``, ``return_overflowing_tokens``, ``is_split_into_words``...), and so are
    ``add_generation_prompt`` and ``chat_template`` for chat messages (nnsight hands those to
    forward, which ignores them). ``return_tensors`` / ``return_attention_mask`` and the other
    ``return_*`` flags only shape what the tokenizer returns: accepted, no effect (the batch always
    carries ids and an attention mask).
  * Chat messages go through ``tokenizer.apply_chat_template`` as the pipeline does: a generation
    prompt is added unless the last message is the assistant's (then it is continued), and
    ``add_special_tokens`` is ignored (the template places them). A tokenizer without a chat
    template raises a ValueError that says how to set one.
  * Token ids (lists, tensors, an encoding) are used as given, with ``truncation=True`` /
    ``max_length`` and ``padding`` / ``pad_to_multiple_of`` applied as the tokenizer applies them to
    text (nnsight passes them to forward, where they do nothing). ``max_length`` alone does not cut
    ids (for text the tokenizer then truncates): ``generate(ids, max_length=N)`` keeps meaning the
    generation's length, as in nnsight. Options that only mean something for text (``prefix``,
    ``stride``, chat options...) raise a TypeError there, as does ``add_special_tokens=True``.
  * Rows are stored without padding and the batch is left-padded (so ``[:, -1]`` is the last real
    token): padding an option asks for becomes a minimum width. ``padding_side="right"`` is refused.
    ``handle_long_generation`` is refused (not supported).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

__all__ = ["GENERATE_TOO", "OPTION_KEYS", "Encoded", "as_chats", "encode_ids", "encode_text", "is_text",
           "take_options"]

# keywords of the tokenizer's __call__ that decide the tokens
_CALL_KEYS = frozenset({
    "add_special_tokens", "padding", "truncation", "max_length", "stride", "is_split_into_words",
    "pad_to_multiple_of", "padding_side", "return_overflowing_tokens", "verbose",
})
# keywords that only shape what the tokenizer returns: the batch always has ids and a mask
_RETURN_KEYS = frozenset({
    "return_tensors", "return_token_type_ids", "return_attention_mask", "return_special_tokens_mask",
    "return_offsets_mapping", "return_length",
})
_CHAT_KEYS = frozenset({
    "tools", "documents", "continue_final_message", "add_generation_prompt", "chat_template",
})
_MERGED = frozenset({"tokenizer_kwargs", "tokenizer_encode_kwargs"})  # dicts of more tokenizer keywords
_TEXT_ONLY = _CHAT_KEYS | {"prefix", "stride", "is_split_into_words", "return_overflowing_tokens"}
OPTION_KEYS = _CALL_KEYS | _RETURN_KEYS | _CHAT_KEYS | _MERGED | {"prefix", "handle_long_generation"}
GENERATE_TOO = frozenset({"max_length"})  # the prompt's truncation length and generate's, as in nnsight
_NO_LIMIT = int(1e20)  # transformers' VERY_LARGE_INTEGER is above this: a tokenizer with no maximum length


class Encoded(NamedTuple):
    rows: list[list[int]]
    width: int


def take_options(kwargs: dict) -> dict:
    """Pop the tokenizer's keywords off ``kwargs`` (in place) and return them, ``tokenizer_kwargs``
    and ``tokenizer_encode_kwargs`` merged in."""
    options = {key: kwargs.pop(key) for key in list(kwargs) if key in OPTION_KEYS}
    for key in _MERGED & options.keys():
        extra = options.pop(key) or {}
        if not isinstance(extra, Mapping):
            raise TypeError(f"{key}= takes a dict of tokenizer keywords, got {type(extra).__name__}")
        options.update(extra)
    if "handle_long_generation" in options:
        raise TypeError("handle_long_generation= is not supported: truncate the prompt with "
                        "truncation=True, max_length=N")
    if options.get("padding_side") not in (None, "left"):
        raise ValueError(
            "padding_side='right' is not supported: glassbox left-pads every batch (so [:, -1] is each "
            "prompt's last token) and gives the model the attention mask and positions that go with it"
        )
    return options


def _is_message(item: Any) -> bool:
    return isinstance(item, Mapping) and "role" in item and "content" in item


def as_chats(data: Any) -> list[list[dict]] | None:
    """One conversation or a list of them (each a list of role/content messages); None otherwise."""
    if not isinstance(data, (list, tuple)) or not data:
        return None
    if _is_message(data[0]):
        return [list(data)]
    if all(isinstance(chat, (list, tuple)) and chat and _is_message(chat[0]) for chat in data):
        return [list(chat) for chat in data]
    return None


def is_text(data: Any) -> bool:
    """A string, or a non-empty list of strings or of lists of strings."""
    if isinstance(data, str):
        return True
    if not isinstance(data, (list, tuple)) or not data:
        return False
    return all(isinstance(item, str) or (isinstance(item, (list, tuple)) and item
                                         and all(isinstance(word, str) for word in item)) for item in data)


def encode_text(tokenizer: Any, data: Any, options: dict) -> Encoded:
    """Text (a string, a list of them) or chat messages through ``tokenizer`` with ``options``."""
    if tokenizer is None:
        from ..errors import TraceStateError

        raise TraceStateError("this model has no tokenizer: pass token ids, or tokenizer=...")
    options = {k: v for k, v in options.items() if k not in _RETURN_KEYS}
    chats = as_chats(data)
    if chats is not None:
        return _encode_chats(tokenizer, chats, options)
    chat_only = sorted(options.keys() & _CHAT_KEYS)
    if chat_only:
        raise TypeError(f"{', '.join(chat_only)} apply to chat messages ([{{'role': 'user', 'content': "
                        "...}]); this input is text")
    prefix = options.pop("prefix", "")
    if options.get("is_split_into_words"):
        if prefix:
            raise TypeError("prefix= does not apply to words given with is_split_into_words=True")
    elif isinstance(data, str):
        data = prefix + data
    else:  # a list of prompts (nnsight also takes lists of them): one row each
        data = [prefix + text for item in data for text in ([item] if isinstance(item, str) else item)]
    encoding = tokenizer(data, return_attention_mask=True, **options)
    ids, mask = encoding["input_ids"], encoding["attention_mask"]
    if ids and not isinstance(ids[0], list):  # one text: one row
        ids, mask = [ids], [mask]
    rows = [[token for token, keep in zip(row, marks) if keep] for row, marks in zip(ids, mask)]
    padded = any(len(row) < len(full) for row, full in zip(rows, ids))
    return Encoded(rows, max(len(full) for full in ids) if padded else 0)


def _encode_chats(tokenizer: Any, chats: list[list[dict]], options: dict) -> Encoded:
    template = options.pop("chat_template", None)
    if template is None and getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"chat messages need a chat template, and this tokenizer ({type(tokenizer).__name__}, "
            f"{getattr(tokenizer, 'name_or_path', '') or 'no name'}) has no chat_template. Set one, e.g. "
            "model.tokenizer.chat_template = \"{% for m in messages %}<|{{ m['role'] }}|>"
            "{{ m['content'] }}\\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}\" "
            "(or copy the instruct version's template of this model), pass chat_template=... to this "
            "trace or invoke, or give the prompt as text"
        )
    tools, documents = options.pop("tools", None), options.pop("documents", None)
    continued = options.pop("continue_final_message", None)
    prompt = options.pop("add_generation_prompt", None)
    options.pop("add_special_tokens", None)  # as the pipeline: the template places the special tokens
    texts = []
    for chat in chats:
        # as the text-generation pipeline: a chat that ends with the assistant's message is continued
        cont = continued if continued is not None else chat[-1]["role"] == "assistant"
        texts.append(tokenizer.apply_chat_template(
            chat, tools=tools, documents=documents, chat_template=template, tokenize=False,
            continue_final_message=cont, add_generation_prompt=(not cont) if prompt is None else prompt,
        ))
    # apply_chat_template(tokenize=True) tokenizes the rendered text exactly so
    return encode_text(tokenizer, texts, {**options, "add_special_tokens": False})


def encode_ids(tokenizer: Any, rows: list[list[int]], options: dict) -> Encoded:
    """Token ids as given, truncated and padded as the tokenizer would truncate and pad text."""
    if not options:
        return Encoded(rows, 0)
    text_only = sorted(options.keys() & _TEXT_ONLY)
    if text_only:
        raise TypeError(f"{', '.join(text_only)} apply to text or chat input; token ids are used as "
                        "they are (tokenize the text with these options, or pass the text)")
    if options.get("add_special_tokens"):
        raise TypeError("add_special_tokens=True does not apply to token ids, which are used as they are: "
                        "pass the text, or add the special tokens to the ids")
    max_length, truncation = options.get("max_length"), options.get("truncation")
    padding = options.get("padding", False)
    padding = "longest" if padding is True else (padding or "do_not_pad")
    padding = getattr(padding, "value", padding)  # a PaddingStrategy
    truncation = getattr(truncation, "value", truncation)
    limit = max_length if max_length is not None else getattr(tokenizer, "model_max_length", None)
    if limit is not None and limit >= _NO_LIMIT:
        limit = None  # the tokenizer's "no maximum length"
    if truncation not in (None, False, "do_not_truncate") and limit is not None:
        keep_end = getattr(tokenizer, "truncation_side", "right") == "left"
        rows = [row[-limit:] if keep_end and len(row) > limit else row[:limit] for row in rows]
    width = 0
    if padding != "do_not_pad":
        width = max(len(row) for row in rows)
        if padding == "max_length" and limit is not None:
            width = max(width, limit)
        multiple = options.get("pad_to_multiple_of")
        if multiple:
            width = -(-width // multiple) * multiple
    return Encoded(rows, width)
