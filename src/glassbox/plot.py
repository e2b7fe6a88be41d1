"""glassbox.plot: figures from values a trace saved; nothing here runs the model.

    lens = torch.stack([model.lm_head(model.model.norm(h[0])) for h in hidden])  # saved layer outputs
    fig = glassbox.plot.logit_lens(lens, ids, model.tokenizer, path="lens.png")
    fig.savefig("lens.svg")                  # a Figure, as usual

Offers (each returns a ``matplotlib.figure.Figure``; ``path=`` also writes it, format by suffix):
    logit_lens(values, tokens, tokenizer)   layers x positions: the top token in each cell, coloured by
                                            its probability; values are logits or probabilities
    patching(scores, tokens)                layers x positions heatmap of a patching metric
    attention(pattern, tokens, head=None)   query x key probabilities of one head or the mean of heads
    norms(values, series=None, log=False)   a norm per layer, one line (or bar group) per series
    token_strings(ids, tokenizer)           each id decoded on its own: the tick labels the plots use

Conventions: token arguments are strings, or ids (a list or tensor) decoded with ``tokenizer``;
``layers=`` names the rows (default 0, 1, ...; layer 0 is drawn at the bottom). A batch dimension
of size 1 (``h[0]`` not taken yet) is dropped. Bad shapes and token counts raise ValueError naming
the expected shape and the one given.

matplotlib is optional (``pip install "glassbox[plot]"``) and imported at the first call. Figures
are drawn on their own Agg canvas, never through pyplot, so a user's chosen backend is left alone;
in Jupyter a returned figure shows itself as a PNG.
"""

from __future__ import annotations

import functools
import io
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["attention", "logit_lens", "norms", "patching", "token_strings"]

_INSTALL = 'glassbox.plot draws with matplotlib, which is not installed: pip install "glassbox[plot]"'
_Tokens = Sequence[str] | Sequence[int] | torch.Tensor


@functools.cache
def _figure_class() -> type:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(_INSTALL) from err

    class GlassboxFigure(Figure):
        """A Figure on its own Agg canvas that Jupyter shows as a PNG without pyplot."""

        def __init__(self, **kwargs: Any) -> None:
            super().__init__(layout="constrained", **kwargs)
            FigureCanvasAgg(self)

        def _repr_png_(self) -> bytes:
            buffer = io.BytesIO()
            self.savefig(buffer, format="png")
            return buffer.getvalue()

    return GlassboxFigure


def _new_figure(width: float, height: float) -> Any:
    return _figure_class()(figsize=(min(width, 40.0), min(height, 40.0)))


def _finish(fig: Any, path: str | os.PathLike | None) -> Any:
    if path is not None:
        fig.savefig(path, dpi=150)
    return fig


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(n) for n in t.shape) + "]"


def _tensor(values: Any, what: str, expected: str) -> torch.Tensor:
    """A float CPU tensor from a tensor, an array, or a list of per-layer tensors."""
    if isinstance(values, torch.Tensor):
        return values.detach().float().cpu()
    if isinstance(values, (list, tuple)) and values and all(isinstance(v, torch.Tensor) for v in values):
        shapes = {tuple(v.shape) for v in values}
        if len(shapes) > 1:
            raise ValueError(f"{what}: the per-layer tensors differ in shape ({sorted(shapes)}); "
                             f"expected {expected}")
        return torch.stack([v.detach().float().cpu() for v in values])
    try:
        return torch.as_tensor(values, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{what}: expected {expected}, got {type(values).__name__}") from err


def _drop_batch(t: torch.Tensor, dims: int, at: int) -> torch.Tensor:
    """Squeeze a size-1 batch dimension at ``at`` when the tensor has one dimension too many."""
    if t.dim() == dims + 1 and t.shape[at] == 1:
        return t.squeeze(at)
    return t


def _decoder(tokenizer: Any) -> Callable[[int], str]:
    if tokenizer is None:
        raise TypeError("token ids need a tokenizer to become strings: pass tokenizer=model.tokenizer, "
                        "or pass the token strings")
    if hasattr(tokenizer, "decode"):
        return lambda token: tokenizer.decode([token])
    if callable(tokenizer):
        return lambda token: tokenizer(token)
    raise TypeError(f"tokenizer must have .decode or be callable, got {type(tokenizer).__name__}")


def token_strings(ids: Sequence[int] | torch.Tensor, tokenizer: Any) -> list[str]:
    """Each id decoded on its own (``[1, n]`` tensors too), e.g. ``['The', ' E', 'iffel']``."""
    if isinstance(ids, torch.Tensor):
        ids = _drop_batch(ids, 1, 0)
        if ids.dim() != 1:
            raise ValueError(f"token ids: expected shape [positions] or [1, positions], got {_shape(ids)}")
        ids = ids.tolist()
    decode = _decoder(tokenizer)
    return [decode(int(token)) for token in ids]


def _tokens(tokens: _Tokens, tokenizer: Any, count: int, what: str) -> list[str]:
    if isinstance(tokens, str):
        raise TypeError("tokens must be one string per position (e.g. token_strings(ids, tokenizer)), "
                        "not a single string")
    if isinstance(tokens, torch.Tensor) or any(not isinstance(t, str) for t in tokens):
        tokens = token_strings(tokens, tokenizer)
    tokens = list(tokens)
    if len(tokens) != count:
        raise ValueError(f"{len(tokens)} tokens given for {count} {what}: pass one token per position")
    return tokens


def _layer_labels(layers: Sequence[Any] | None, count: int) -> list[str]:
    if layers is None:
        return [str(i) for i in range(count)]
    if len(layers) != count:
        raise ValueError(f"{len(layers)} layer labels given for {count} layers")
    return [str(layer) for layer in layers]


def _shown(text: str, limit: int = 10) -> str:
    """A token as a label: control characters and all-blank tokens made visible, long ones cut."""
    text = text.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    if text and not text.strip():
        text = text.replace(" ", "␣")  # an all-space token would be an empty-looking cell
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _ticks(ax: Any, axis: str, labels: Sequence[str], rotate: bool = False) -> None:
    # parse_math=False: a token such as "$" must not switch the label into mathtext
    options = {"parse_math": False, "fontsize": 8}
    if axis == "x":
        ax.set_xticks(range(len(labels)), [_shown(t, 16) for t in labels], **options,
                      rotation=45 if rotate else 0, ha="right" if rotate else "center")
    else:
        ax.set_yticks(range(len(labels)), [_shown(t, 16) for t in labels], **options)


def _grid_figure(rows: int, columns: int) -> Any:
    return _new_figure(2.5 + 0.85 * columns, 1.6 + 0.32 * rows)


def logit_lens(values: Any, tokens: _Tokens, tokenizer: Any, *, layers: Sequence[Any] | None = None,
               title: str | None = None, path: str | os.PathLike | None = None) -> Any:
    """Layers x positions; each cell names the top token and is coloured by its probability.

    ``values``: logits or probabilities ``[layers, positions, vocab]``, or a list of ``[positions,
    vocab]`` (``[1, positions, vocab]``) per layer. Rows whose entries are non-negative and sum to 1
    are taken as probabilities; anything else goes through a softmax.
    """
    expected = "[layers, positions, vocab] (or a list of [positions, vocab], one per layer)"
    lens = _drop_batch(_tensor(values, "logit_lens values", expected), 3, 1)
    if lens.dim() != 3:
        raise ValueError(f"logit_lens values: expected shape {expected}, got {_shape(lens)}")
    is_probability = bool((lens >= 0).all()) and torch.allclose(lens.sum(-1), torch.ones(()), atol=1e-3)
    probs = lens if is_probability else torch.softmax(lens, -1)
    top_p, top_id = probs.max(-1)
    count, positions = top_p.shape
    labels = _tokens(tokens, tokenizer, positions, "positions")
    decode = _decoder(tokenizer)
    names = {int(i): decode(int(i)) for i in top_id.unique()}

    fig = _grid_figure(count, positions)
    ax = fig.add_subplot()
    image = ax.imshow(top_p.numpy(), cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto", origin="lower")
    for layer in range(count):
        for position in range(positions):
            p = top_p[layer, position].item()
            ax.text(position, layer, _shown(names[int(top_id[layer, position])]), ha="center", va="center",
                    fontsize=7, color="white" if p > 0.55 else "black", parse_math=False)
    _ticks(ax, "x", labels, rotate=True)
    _ticks(ax, "y", _layer_labels(layers, count))
    ax.set_xlabel("input token (position)")
    ax.set_ylabel("layer")
    ax.set_title(title or "Logit lens: top next token by layer")
    fig.colorbar(image, ax=ax, label="probability of the top token")
    return _finish(fig, path)


def patching(scores: Any, tokens: _Tokens, *, layers: Sequence[Any] | None = None, tokenizer: Any = None,
             label: str = "metric", title: str | None = None, annotate: bool | None = None,
             path: str | os.PathLike | None = None) -> Any:
    """A layers x positions heatmap of what patching each (layer, position) did to ``label``.

    ``scores``: ``[layers, positions]``. Signed scores get a diverging map centred on 0. Cells carry
    their value when the grid is small enough to read (``annotate=`` forces it either way).
    """
    grid = _tensor(scores, "patching scores", "[layers, positions]")
    if grid.dim() != 2:
        raise ValueError(f"patching scores: expected shape [layers, positions], got {_shape(grid)}")
    count, positions = grid.shape
    labels = _tokens(tokens, tokenizer, positions, "positions")
    low, high = grid.min().item(), grid.max().item()
    if low < 0 < high:
        bound = max(-low, high)
        colours = {"cmap": "RdBu_r", "vmin": -bound, "vmax": bound}
    else:
        colours = {"cmap": "Purples", "vmin": min(low, 0.0), "vmax": max(high, 0.0) or 1.0}

    fig = _grid_figure(count, positions)
    ax = fig.add_subplot()
    image = ax.imshow(grid.numpy(), aspect="auto", origin="lower", **colours)
    if annotate if annotate is not None else count * positions <= 400:
        span = (colours["vmax"] - colours["vmin"]) or 1.0
        for layer in range(count):
            for position in range(positions):
                value = grid[layer, position].item()
                strong = abs(value - (colours["vmin"] + colours["vmax"]) / 2) > 0.3 * span
                ax.text(position, layer, f"{value:.2g}", ha="center", va="center", fontsize=7,
                        color="white" if strong else "black")
    _ticks(ax, "x", labels, rotate=True)
    _ticks(ax, "y", _layer_labels(layers, count))
    ax.set_xlabel("patched position")
    ax.set_ylabel("patched layer")
    ax.set_title(title or f"Activation patching: {label}")
    fig.colorbar(image, ax=ax, label=label)
    return _finish(fig, path)


def attention(pattern: Any, tokens: _Tokens, *, head: int | None = None, tokenizer: Any = None,
              title: str | None = None, path: str | os.PathLike | None = None) -> Any:
    """Query x key attention probabilities of one ``head``, or the mean over heads (``head=None``).

    ``pattern``: ``[heads, queries, keys]`` (``[1, heads, queries, keys]`` as ``attn_probs.output``
    saves it) or one head's ``[queries, keys]``. ``tokens`` label the keys; the queries are the last
    ``queries`` of them (all of them in a plain forward).
    """
    expected = "[heads, queries, keys] or [queries, keys]"
    probs = _drop_batch(_tensor(pattern, "attention pattern", expected), 3, 0)
    if probs.dim() == 3:
        heads = probs.shape[0]
        if head is None:
            probs, which = probs.mean(0), f"mean of {heads} heads"
        elif not -heads <= head < heads:
            raise ValueError(f"head={head} is out of range: the pattern has {heads} heads")
        else:
            probs, which = probs[head], f"head {head % heads}"
    elif probs.dim() == 2:
        if head is not None:
            raise ValueError(f"head={head} given, but the pattern {_shape(probs)} is one head's "
                             "[queries, keys]")
        which = "one head"
    else:
        raise ValueError(f"attention pattern: expected shape {expected}, got {_shape(probs)}")
    queries, keys = probs.shape
    if queries > keys:
        raise ValueError(f"attention pattern: {queries} queries but only {keys} keys; expected {expected}")
    labels = _tokens(tokens, tokenizer, keys, "keys")

    fig = _new_figure(2.8 + 0.55 * keys, 1.8 + 0.45 * queries)
    ax = fig.add_subplot()
    image = ax.imshow(probs.numpy(), cmap="viridis", vmin=0.0, aspect="auto")
    _ticks(ax, "x", labels, rotate=True)
    _ticks(ax, "y", labels[keys - queries:])
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query (attending)")
    ax.set_title(title or f"Attention pattern ({which})")
    fig.colorbar(image, ax=ax, label="attention probability")
    return _finish(fig, path)


def norms(values: Any, *, series: _Tokens | None = None, layers: Sequence[Any] | None = None,
          tokenizer: Any = None, kind: str = "line", log: bool = False, ylabel: str = "norm",
          title: str | None = None, path: str | os.PathLike | None = None) -> Any:
    """A norm per layer: ``[layers]`` is one series; ``[layers, series]`` (e.g. one per position,
    named by ``series=`` token strings or ids) draws one line, or one bar of each group, per series.
    ``log=True`` puts the norms on a log scale (one outlier position, such as an attention sink's
    first token, otherwise flattens the rest).
    """
    if kind not in ("line", "bar"):
        raise ValueError(f"kind must be 'line' or 'bar', got {kind!r}")
    table = _tensor(values, "norms values", "[layers] or [layers, series]")
    if table.dim() == 1:
        table = table[:, None]
        if series is not None:
            raise ValueError(f"series= names {len(series)} series, but values {_shape(table[:, 0])} are one "
                             "series; pass [layers, series]")
    elif table.dim() != 2:
        raise ValueError(f"norms values: expected shape [layers] or [layers, series], got {_shape(table)}")
    count, width = table.shape
    names = None if series is None else _tokens(series, tokenizer, width, "series")
    if names is None and width > 1:
        names = [str(i) for i in range(width)]
    layer_labels = _layer_labels(layers, count)

    fig = _new_figure(max(6.0, 1.5 + 0.25 * count * (width if kind == "bar" else 1) ** 0.5), 4.0)
    ax = fig.add_subplot()
    x = torch.arange(count, dtype=torch.float32)
    for column in range(width):
        label = None if names is None else _shown(names[column], 16)
        if kind == "line":
            ax.plot(x.numpy(), table[:, column].numpy(), marker="o", markersize=3, label=label)
        else:
            step = 0.8 / width
            left = x - 0.4 + step * (column + 0.5)
            ax.bar(left.numpy(), table[:, column].numpy(), width=step, label=label)
    # at most ~16 labelled ticks, so deep models stay legible
    every = max(1, -(-count // 16))
    ax.set_xticks(range(0, count, every), layer_labels[::every], fontsize=8)
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.set_title(title or f"{ylabel} by layer")
    ax.grid(alpha=0.3)
    if names is not None:
        legend = ax.legend(fontsize=8, ncols=1 if width <= 8 else 2)
        for text in legend.get_texts():
            text.set_parse_math(False)
    return _finish(fig, path)
