"""PEFT adapters (LoRA and its relatives) grafted into a Hugging Face model, in place.

Offers:
    attach(module, adapter, *, weights=True)
        inject ``adapter`` into ``module``: a ``peft`` config object (``LoraConfig(...)``:
        fresh adapter weights, as peft initialises them) or the folder (or hub id) of an
        adapter saved with ``PeftModel.save_pretrained`` (its weights are loaded).
        ``weights=False``: the adapter's modules only (a model still on the meta device).

``LanguageModel(..., peft=...)`` and ``TransformersModel(..., peft=...)`` call it on the
meta model (modules only, so the envoy tree shows them before any weights load) and again
on the real model when the weights load.

Decisions:
  * In place (``peft.inject_adapter_in_model``), not ``PeftModel``: a PeftModel wraps the
    model as ``base_model.model``, which would move every path. Injected, each targeted
    module becomes peft's layer holding the original as ``base_layer`` and every other path
    stays the same: ``model.model.layers[0].self_attn.q_proj.lora_A.default.output``.
  * A saved adapter whose weights do not all land on this model is refused (ValueError):
    peft places weights by name and leaves unmatched ones at their initialisation, and
    since ``lora_B`` starts at zero such an adapter silently does nothing.
  * Adapters that work by changing ``forward`` rather than modules (prompt and prefix
    tuning) cannot be injected and are refused.
  * ``peft`` is an optional dependency, imported on first use.
"""

from __future__ import annotations

import os
from typing import Any

import torch

_WRAPPER_PREFIX = "base_model.model."  # how PeftModel.save_pretrained names the weights


def attach(module: torch.nn.Module, adapter: Any, *, weights: bool = True) -> None:
    """Inject ``adapter`` (a peft config, or a saved adapter's folder or id) into ``module``."""
    peft = _import_peft()
    saved = not isinstance(adapter, peft.PeftConfig)
    config = peft.PeftConfig.from_pretrained(os.fspath(adapter)) if saved else adapter
    if config.is_prompt_learning or getattr(config, "is_adaption_prompt", False):
        raise ValueError(
            f"a {config.peft_type} adapter changes the model's forward instead of adding modules, "
            "so it cannot be traced module by module; peft= takes LoRA-style adapters"
        )
    before = {id(parameter) for parameter in module.parameters()}
    peft.inject_adapter_in_model(config, module)
    if not (weights and saved):
        return
    added = {name for name, parameter in module.named_parameters() if id(parameter) not in before}
    state = {
        key.removeprefix(_WRAPPER_PREFIX): value
        for key, value in peft.utils.load_peft_weights(os.fspath(adapter), device="cpu").items()
    }
    result = peft.set_peft_model_state_dict(module, state)
    missing = [key for key in result.missing_keys if key in added]
    if missing or result.unexpected_keys:
        unplaced = (list(result.unexpected_keys) or missing)[:3]
        raise ValueError(
            f"the adapter {os.fspath(adapter)!r} does not fit this model: peft could not place its "
            f"weights by name ({unplaced} ...), and an adapter left at its initialisation does "
            "nothing. Was it trained on this architecture (the same task / Auto class)?"
        )


def _import_peft() -> Any:
    try:
        import peft
    except ImportError as exc:
        raise ImportError("peft= needs the optional `peft` package: pip install peft") from exc
    return peft
