"""Envoy's fields are reached only through envoy.py's seam (module_of, path_of, ... slots_of),
and the seam says what the fields say.

An AST scan of src/glassbox: outside envoy.py, no ``x._module`` (or another of Envoy's fields),
no ``x.__dict__["_module"]`` and no ``getattr(x, "_module")``. ``self._path`` counts only in a
file that never assigns ``self._path`` (a class's own field of the same name is not Envoy's; an
Envoy subclass reading ``self._module`` is a reader like any other).
"""

from __future__ import annotations

import ast
from pathlib import Path

import torch

import glassbox
from glassbox.envoy import (
    children_of,
    display_of,
    module_of,
    name_of,
    parent_of,
    path_of,
    rebind,
    rename_of,
    root_of,
    slots_of,
)

SRC = Path(__file__).resolve().parents[1] / "src" / "glassbox"
FIELDS = frozenset({"_module", "_path", "_by_name", "_children", "_root", "_display", "_parent",
                    "_name", "_rename", "_slots", "_site", "_source_view", "_on_install"})
# files allowed to read Envoy's fields besides envoy.py itself: none (every one was converted)
PENDING: frozenset[str] = frozenset()


def _own_fields(tree: ast.AST) -> set[str]:
    """Fields a file assigns on ``self`` (its classes' own, whatever Envoy calls its fields)."""
    own = set()
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else (
            [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else [])
        for target in targets:
            for t in target.elts if isinstance(target, ast.Tuple) else [target]:
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                    own.add(t.attr)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr == "__setattr__" and len(node.args) >= 2 \
                and isinstance(node.args[1], ast.Constant):
            own.add(node.args[1].value)  # object.__setattr__(self, "_module", ...) in a __slots__ class
        if isinstance(node, ast.ClassDef):
            for item in node.body:  # __slots__ = ("_module", ...)
                names = [getattr(t, "id", None) for t in item.targets] if isinstance(item, ast.Assign) else []
                if "__slots__" in names:
                    own |= {e.value for e in ast.walk(item.value) if isinstance(e, ast.Constant)}
    return own


def _reads(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    own = _own_fields(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in FIELDS:
            is_self = isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
            if not (is_self and node.attr in own):
                found.append(f"{node.lineno}: .{node.attr}")
        elif isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) \
                and node.value.attr == "__dict__" and isinstance(node.slice, ast.Constant) \
                and node.slice.value in FIELDS:
            found.append(f"{node.lineno}: __dict__[{node.slice.value!r}]")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id in ("getattr", "setattr", "hasattr") and len(node.args) >= 2 \
                and isinstance(node.args[1], ast.Constant) and node.args[1].value in FIELDS:
            found.append(f"{node.lineno}: {node.func.id}(..., {node.args[1].value!r})")
    return found


def test_only_envoy_py_reads_envoy_fields() -> None:
    offenders = {}
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel == "envoy.py" or rel in PENDING:
            continue
        reads = _reads(path)
        if reads:
            offenders[rel] = reads
    assert not offenders, f"use envoy.py's seam (module_of, path_of, ..., slots_of) instead: {offenders}"


def test_the_scan_sees_a_read(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "class Mine:\n"
        "    def __init__(self):\n"
        "        self._path = 'own field'\n"
        "    def f(self, envoy):\n"
        "        return self._path, envoy._module, envoy.__dict__['_site'], getattr(envoy, '_root')\n"
    )
    found = {r.split(": ")[1] for r in _reads(sample)}
    assert found == {"._module", "__dict__['_site']", "getattr(..., '_root')"}


# ---------------------------------------------------------------- what the seam says


class _Wrapper(torch.nn.Module):
    """A model whose submodules are called like the seam's words (DataParallel has ``.module``)."""

    def __init__(self) -> None:
        super().__init__()
        self.module = torch.nn.Linear(2, 2)
        self.path = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.path(self.module(x))


def test_the_seam_names_no_submodule_away() -> None:
    model = glassbox.NNsight(_Wrapper(), rename={"path.0": "first"})
    assert module_of(model.module) is model._model.module  # attribute access still finds the submodule
    inner = model.path[0]
    assert (path_of(inner), display_of(inner), name_of(inner)) == ("path.0", "model.path[0]", "0")
    assert parent_of(inner) is model.path and parent_of(model) is None
    assert root_of(inner) is model and list(children_of(model)) == ["module", "path"]
    assert model.first is inner and rename_of(inner) == {"path.0": ("first",)}
    with model.trace(torch.ones(1, 2)):
        out = model.path[0].output.save()
    assert out.shape == (1, 2)


def test_rebind_points_the_tree_at_new_modules_and_drops_their_slots() -> None:
    model = glassbox.NNsight(_Wrapper())
    with model.trace(torch.ones(1, 2)):
        model.path[0].output.save()
    assert slots_of(model.path[0]).get("site") is not None  # the interleaver keeps its Site there
    other = _Wrapper()
    rebind(model, other)
    assert module_of(model) is other and module_of(model.path[0]) is other.path[0]
    assert slots_of(model.path[0]) == {}
    with model.trace(torch.ones(1, 2)):
        out = model.path[0].output.save()
    assert torch.equal(out, other.path[0](other.module(torch.ones(1, 2))))


def test_weights_loaded_after_a_scan_are_what_the_trace_sees() -> None:
    """LanguageModel loads at the first real trace and rebinds its envoys to the loaded modules: a
    Site a scan kept on an envoy was for the meta module and must not be reused."""
    from glassbox.offline import tiny_gpt2_path

    model = glassbox.LanguageModel(tiny_gpt2_path())
    with model.scan("hello world"):
        model.transformer.h[0].output.save()
    with model.trace("hello world"):
        hidden = model.transformer.h[0].output.save()
    first = hidden[0] if isinstance(hidden, tuple) else hidden
    assert first.device.type != "meta" and torch.isfinite(first).all()
