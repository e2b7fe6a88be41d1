"""Batch rows: combine the inputs of several invokes, and give each invoke its rows.

Offers:
    Rows                      which rows of the batch belong to one invoke
    narrow(value, rows, n)    the view an invoke sees of a batched value
    own_copy(view)            what a body with ``Rows.own`` is handed instead: a copy
    copy_back(view, copy, full=None)   its in-place edits, written back into the batch
    splice(full, rows, new, n, own=False)  put an invoke's replacement back into the batch
    SharedWrite               a body with ``Rows.own`` changed a value every body shares
    concat_args(list)         batch positional/keyword inputs of plain modules

A tensor belongs to the batch when its first dimension equals the batch size;
everything else (configs, caches, scalars) is shared by all invokes as it is.

Rows with ``trim`` (``tracing.run_together``, where each independent body must
see exactly what it would see alone): the batch is left-padded to ``width``
positions, and the body's own input was only ``width - trim`` long, so every
dimension (after the first) of size ``width`` is cut to its last
``width - trim`` positions. The caller must therefore choose a ``width`` that no
other dimension of the model has (a server's co-tenant batches do).
Narrowed tensors are views, so in-place edits reach the model; replacements
are spliced with ``torch.cat`` so autograd keeps working.

Rows with ``own`` (every body of ``tracing.run_together``: requests of different
users) are handed a COPY of their part instead of a view, so that no API
(``as_strided``, ``.base``, storage access) reaches another body's rows; the
copy is written back into the batch when the body hands control back, so in-place
edits still reach the model. Objects that are not tensors, containers or plain
scalars (a key/value cache holding every row, a module) are handed as None.
What such a body may change is its own rows only: a value the batch shares (Llama's
rotary ``position_embeddings``, ``cache_position``, flags, a cache) that it edited or
replaced differently raises ``SharedWrite`` (``copy_back(..., full=)``,
``splice(..., own=True)``) instead of reaching the other bodies: the pass fails, and a
server runs each request alone (one of them would have changed the others' values).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Rows:
    start: int
    stop: int
    trim: int = 0  # leading padding positions these rows do not see (see the module docstring)
    width: int = 0  # the padded sequence length of the batch, when trim is set
    own: bool = False  # hand a copy, not a view (see the module docstring)

    @property
    def count(self) -> int:
        return self.stop - self.start


def _is_batched(value: Any, batch_size: int, min_ndim: int) -> bool:
    return (
        isinstance(value, torch.Tensor)
        and value.ndim >= max(min_ndim, 1)
        and value.shape[0] == batch_size
    )


def narrow(value: Any, rows: Rows, batch_size: int, min_ndim: int = 1) -> Any:
    """The part of ``value`` that belongs to ``rows`` (views for tensors)."""
    if _is_batched(value, batch_size, min_ndim):
        view = value[rows.start : rows.stop]
        return _trimmed(view, rows) if rows.trim else view
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(narrow(v, rows, batch_size, min_ndim) for v in value)
    if isinstance(value, list):
        return [narrow(v, rows, batch_size, min_ndim) for v in value]
    if isinstance(value, dict):
        items = {k: narrow(v, rows, batch_size, min_ndim) for k, v in value.items()}
        return _rebuild(value, items)
    return value


def _trimmed(view: torch.Tensor, rows: Rows) -> torch.Tensor:
    for dim in range(1, view.ndim):
        if view.shape[dim] == rows.width:
            view = view.narrow(dim, rows.trim, rows.width - rows.trim)
    return view


_PLAIN = (int, float, bool, str, bytes, complex, torch.dtype, torch.device, torch.Size, type(None))


def own_copy(view: Any) -> Any:
    """A copy of ``view`` that shares no memory with the batch: tensors cloned (contiguous, their
    own storage), containers rebuilt, plain scalars kept, any other object replaced by None."""
    if isinstance(view, torch.Tensor):
        # detached: the autograd graph would lead back to the batch (batched bodies use no gradients)
        return view.detach().clone(memory_format=torch.contiguous_format)
    if isinstance(view, _PLAIN):
        return view
    if isinstance(view, tuple) and not hasattr(view, "_fields"):
        return tuple(own_copy(v) for v in view)
    if isinstance(view, list):
        return [own_copy(v) for v in view]
    if isinstance(view, dict):
        return _rebuild(view, {k: own_copy(v) for k, v in view.items()})
    return None


class SharedWrite(ValueError):
    """A body of independent requests (``Rows.own``) changed a value the batch shares between them."""


_SHARED = ("a request sharing this forward pass changed {what}, which the pass shares between its "
           "requests: it runs alone, where that value is its own")


def copy_back(view: Any, copy: Any, full: Any = None) -> None:
    """Write a body's (possibly edited) ``own_copy`` back into the batch ``view`` it came from.
    With ``full`` (the batch's value ``view`` was narrowed from), a part of it the batch shares
    (``view`` is ``full`` there: not narrowed) is never written: SharedWrite if the copy differs."""
    if isinstance(view, torch.Tensor):
        if isinstance(copy, torch.Tensor) and copy.shape == view.shape and copy is not view:
            if view is full:
                if not torch.equal(copy, view):
                    raise SharedWrite(_SHARED.format(what=f"a shared tensor of shape {tuple(view.shape)}"))
                return
            with torch.no_grad():
                view.copy_(copy)
    elif isinstance(view, (tuple, list)) and isinstance(copy, (tuple, list)) and len(view) == len(copy):
        parts = full if isinstance(full, (tuple, list)) and len(full) == len(view) else [None] * len(view)
        for v, c, f in zip(view, copy, parts):
            copy_back(v, c, f)
    elif isinstance(view, dict) and isinstance(copy, dict):
        for key, v in view.items():
            if key in copy:
                copy_back(v, copy[key], full.get(key) if isinstance(full, dict) else None)


def _rebuild(like: dict, items: dict) -> dict:
    """A mapping of ``like``'s type (Hugging Face ModelOutput dataclasses
    included) holding ``items``."""
    if type(like) is dict:
        return items
    try:
        return type(like)(**items)
    except TypeError:
        return items


def splice(full: Any, rows: Rows, new: Any, batch_size: int, min_ndim: int = 1, own: bool = False) -> Any:
    """``full`` with the rows of one invoke replaced by ``new``. With ``own`` (independent
    requests), a part the batch shares must come back as it was: SharedWrite otherwise."""
    if new is full:
        return full
    if _is_batched(full, batch_size, min_ndim):
        if rows.trim and isinstance(new, torch.Tensor):
            # the rows as they are, with the part these rows see replaced (autograd-safe: a clone)
            block = full[rows.start : rows.stop].clone()
            _trimmed(block, rows).copy_(new)
            return splice(full, Rows(rows.start, rows.stop), block, batch_size, min_ndim)
        if isinstance(new, torch.Tensor) and new.shape[:1] == (rows.count,):
            pieces = [full[: rows.start], new.to(full.dtype), full[rows.stop :]]
            return torch.cat([p for p in pieces if p.shape[0]], dim=0)
        if isinstance(new, torch.Tensor) and new.ndim == 0:
            new = new.expand_as(full[rows.start : rows.stop])
            return splice(full, rows, new, batch_size, min_ndim)
        raise ValueError(
            f"replacement for {rows.count} batch row(s) has shape "
            f"{tuple(getattr(new, 'shape', ()))}; expected first dimension {rows.count}"
        )
    if isinstance(full, tuple) and isinstance(new, tuple) and len(full) == len(new):
        return type(full)(splice(f, rows, n, batch_size, min_ndim, own) for f, n in zip(full, new))
    if isinstance(full, list) and isinstance(new, list) and len(full) == len(new):
        return [splice(f, rows, n, batch_size, min_ndim, own) for f, n in zip(full, new)]
    if isinstance(full, dict) and isinstance(new, dict):
        if own and not new.keys() <= full.keys():
            raise SharedWrite(_SHARED.format(what=f"the keywords ({sorted(set(new) - set(full))} added)"))
        out = dict(full)
        for k, v in new.items():
            out[k] = splice(full[k], rows, v, batch_size, min_ndim, own) if k in full else v
        return _rebuild(full, out)
    if own and not _unchanged(full, new):
        raise SharedWrite(_SHARED.format(what=f"a shared {type(full).__name__}"))
    return new


def _unchanged(full: Any, new: Any) -> bool:
    """Whether ``new`` (what a body handed back for a shared part) is what the batch has there. A
    part handed to it as None (an object it could not be given: a cache) must come back None."""
    if isinstance(full, torch.Tensor):
        return isinstance(new, torch.Tensor) and new.shape == full.shape and torch.equal(new, full)
    if new is None and own_copy(full) is None:
        return True
    try:
        return type(new) is type(full) and bool(new == full)
    except Exception:  # a comparison that does not give a truth value: not the same
        return False


def _row_count(args: tuple, kwargs: dict) -> int:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.ndim > 0:
            return int(value.shape[0])
    return 1


def concat_args(items: list[tuple[tuple, dict]]) -> tuple[tuple, dict, list[Rows]]:
    """Batch several ``(args, kwargs)`` inputs of a plain module along dim 0."""
    counts = [_row_count(a, k) for a, k in items]
    rows, start = [], 0
    for n in counts:
        rows.append(Rows(start, start + n))
        start += n
    first_args, first_kwargs = items[0]
    if len(items) == 1:
        return first_args, first_kwargs, rows
    args = tuple(_merge([a[i] for a, _ in items], i) for i in range(len(first_args)))
    kwargs = {k: _merge([kw[k] for _, kw in items], k) for k in first_kwargs}
    return args, kwargs, rows


def _merge(values: list[Any], where: Any) -> Any:
    if all(isinstance(v, torch.Tensor) for v in values):
        return torch.cat(values, dim=0)
    if all(v is values[0] or v == values[0] for v in values):
        return values[0]
    raise ValueError(
        f"cannot batch input {where!r} across invokes: it is not a tensor and differs "
        "between invokes. Pass tensors with a batch dimension, or run separate traces."
    )
