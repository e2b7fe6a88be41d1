"""Model outputs that also index like their main tensor.

Offers:
    tensor_like(output)   give a Hugging Face ModelOutput tensor behaviour:
        ``out[0, -1]``, ``out[:, -1]``, ``out.shape``, ``out.argmax(-1)``,
        ``torch.softmax(out, -1)`` act on its first field (``logits`` for a
        causal LM, ``last_hidden_state`` for an encoder), while ``out.logits``,
        ``out["logits"]`` and ``out[0]`` keep their Hugging Face meaning.

nnsight tutorials treat ``model.output`` as the logits; Hugging Face returns a
ModelOutput. The instance keeps its identity (only its class is swapped for a
cached subclass), so the model and later hooks see the same object.
"""

from __future__ import annotations

from typing import Any

import torch

_subclasses: dict[type, type] = {}


class _TensorLike:
    """Mixin over ModelOutput: tensor-style access goes to the first field."""

    def _main(self) -> torch.Tensor:
        return self.to_tuple()[0]  # type: ignore[attr-defined]

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, (str, int, slice)):
            return super().__getitem__(key)  # type: ignore[misc]
        return self._main()[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        if isinstance(key, (str, int, slice)):
            super().__setitem__(key, value)  # type: ignore[misc]
        else:
            self._main()[key] = value

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._main(), name)

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        def unwrap(value: Any) -> Any:
            if isinstance(value, _TensorLike):
                return value._main()
            if isinstance(value, (list, tuple)):
                return type(value)(unwrap(v) for v in value)
            return value

        return func(*unwrap(args), **{k: unwrap(v) for k, v in (kwargs or {}).items()})


def tensor_like(output: Any) -> Any:
    """``output`` with tensor-style indexing, if it is a ModelOutput with tensors."""
    generic = __import__("sys").modules.get("transformers.utils.generic")
    if generic is None or not isinstance(output, generic.ModelOutput) or isinstance(output, _TensorLike):
        return output
    values = output.to_tuple()
    if not values or not isinstance(values[0], torch.Tensor):
        return output
    cls = type(output)
    sub = _subclasses.get(cls)
    if sub is None:
        sub = _subclasses[cls] = type(cls.__name__, (_TensorLike, cls), {"__module__": cls.__module__})
    output.__class__ = sub
    return output
