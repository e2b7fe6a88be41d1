"""Attention probabilities as a module you can read and edit.

Offers:
    ATTN_IMPLEMENTATION = "glassbox"   pass as ``LanguageModel(...,
        attn_implementation="glassbox")``: eager attention whose softmax
        probabilities flow through an identity submodule ``attn_probs`` added
        to every attention module, so
        ``model.transformer.h[0].attn.attn_probs.output`` is
        ``[batch, heads, query, key]`` and assigning/editing it changes what
        the layer attends to.
    add_probe_modules(model)           attach those identity submodules.

Why: in transformers 5 eager attention applies dropout functionally, so the
``attn_dropout`` module nnsight tutorials read never runs, and SDPA never
materialises the probabilities at all. (``attn_implementation="eager"`` also
works for reading: the attention module's ``.output[1]`` is the weights, but
editing that tuple entry changes nothing downstream.)
"""

from __future__ import annotations

from typing import Any

import torch

ATTN_IMPLEMENTATION = "glassbox"


class AttentionProbs(torch.nn.Module):
    """Identity; exists so attention probabilities pass a module boundary."""

    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        return probs


def _glassbox_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:  # grouped-query attention: share each key/value head
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[..., : key.shape[-2]]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probe = getattr(module, "attn_probs", None)
    if probe is not None:
        probs = probe(probs)
    probs = torch.nn.functional.dropout(probs, p=dropout, training=module.training)
    output = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return output, probs


_registered = False


def register() -> None:
    """Make ``attn_implementation="glassbox"`` known to transformers (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, _glassbox_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, ALL_MASK_ATTENTION_FUNCTIONS["eager"])
    _registered = True


def add_probe_modules(model: torch.nn.Module) -> int:
    """Give every attention module an ``attn_probs`` child; returns how many."""
    added = 0
    for module in list(model.modules()):
        if type(module).__name__.endswith("Attention") and not hasattr(module, "attn_probs"):
            module.add_module("attn_probs", AttentionProbs())
            added += 1
    return added
