"""The model contract (models/contract.py) is complete and implemented.

Every ``model._hook`` the package calls on a model object (the tracer, editing, generation, the
server, the client, activations) must be declared in ``ModelContract``: a new hook that is not fails
here. NNsight, LanguageModel and VLLM implement every declared hook, with compatible signatures.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import torch

import glassbox
from glassbox.envoy import Envoy
from glassbox.models.contract import HOOKS, ModelContract
from glassbox.offline import tiny_gpt2_path

PACKAGE = Path(glassbox.__file__).parent
# names a model object goes by where the core holds one (tracer.model, interleaver.root, ...)
MODEL_NAMES = {"model", "root"}
# a wrapper's own files read its own state freely: they define hooks, they do not call them
WRAPPERS = {"models/base.py", "models/language.py", "models/transformers_model.py", "models/hosted.py",
            "vllm/model.py"}


def _is_model(node: ast.AST) -> bool:
    if isinstance(node, ast.Name):
        return node.id in MODEL_NAMES
    if isinstance(node, ast.Attribute):
        return node.attr in MODEL_NAMES
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "type":
        return bool(node.args) and _is_model(node.args[0])  # getattr(type(model), "_hook", None)
    return False


def _private(name: object) -> bool:
    return isinstance(name, str) and name.startswith("_") and not name.startswith("__")


def _hooks_used(tree: ast.AST) -> set[str]:
    """``model._x``, ``getattr(model, "_x")`` / ``hasattr`` / ``getattr(type(model), ...)``, and
    ``model.__dict__["_x"]`` / ``model.__dict__.get("_x")``."""
    used = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr) and _is_model(node.value):
            used.add(node.attr)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in (
                "getattr", "hasattr") and len(node.args) >= 2 and _is_model(node.args[0]):
            key = node.args[1]
            if isinstance(key, ast.Constant) and _private(key.value):
                used.add(key.value)
        elif isinstance(node, ast.Attribute) and node.attr == "__dict__" and _is_model(node.value):
            parent = getattr(node, "parent", None)
            key = None
            if isinstance(parent, ast.Subscript):
                key = parent.slice
            elif isinstance(parent, ast.Attribute) and parent.attr == "get":
                call = getattr(parent, "parent", None)
                key = call.args[0] if isinstance(call, ast.Call) and call.args else None
            if isinstance(key, ast.Constant) and _private(key.value):
                used.add(key.value)
    return used


def _scan() -> dict[str, set[str]]:
    where: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel in WRAPPERS:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            for child in ast.iter_child_nodes(node):
                child.parent = node  # type: ignore[attr-defined]
        for name in _hooks_used(tree):
            where.setdefault(name, set()).add(rel)
    return where


def _envoy_names() -> set[str]:
    """What every Envoy has (the tree, ``_at``...): Envoy's own API, not the model contract."""
    return set(dir(Envoy)) | set(vars(Envoy(torch.nn.Sequential(torch.nn.Linear(1, 1)))))


def test_the_scan_finds_the_hooks_it_should():
    # guards the scanner itself: these are called through every form it recognises
    used = _scan()
    assert {"_prepare", "_execute", "_remote_name", "_wire_result", "_no_gradients",
            "_requests_per_invoke", "_narrow_min_ndim", "_envoy_of"} <= set(used)


def test_every_hook_called_on_a_model_is_declared_in_the_contract():
    undeclared = {name: sorted(files) for name, files in _scan().items()
                  if name not in HOOKS and name not in _envoy_names()}
    assert not undeclared, (
        f"hooks called on a model but not declared in glassbox/models/contract.py: {undeclared}; "
        "add each to ModelContract with one line on who calls it and when"
    )


def test_every_declared_hook_is_used_somewhere():
    # _batch_size: nnsight 0.8's override point, called by NNsight's own _batch (models/base.py)
    unused = HOOKS - set(_scan()) - {"active", "_batch_size"}
    assert not unused, f"ModelContract declares hooks nothing calls: {sorted(unused)}"


def _classes() -> list[type]:
    from glassbox.models.language import LanguageModel
    from glassbox.models.transformers_model import TransformersModel
    from glassbox.vllm.model import VLLM  # importable without vLLM: it is needed only to run

    return [glassbox.NNsight, LanguageModel, TransformersModel, VLLM]


@pytest.mark.parametrize("cls", _classes(), ids=lambda c: c.__name__)
def test_each_wrapper_class_has_every_hook_with_a_compatible_signature(cls):
    missing = sorted(name for name in HOOKS if not hasattr(cls, name))
    assert not missing, f"{cls.__name__} lacks {missing}"
    for name in HOOKS:
        declared = getattr(ModelContract, name, None)
        if not inspect.isfunction(declared):
            continue
        want = [p.name for p in inspect.signature(declared).parameters.values()
                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        params = inspect.signature(getattr(cls, name)).parameters
        have = [p.name for p in params.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        assert have[:len(want)] == want, f"{cls.__name__}.{name}{inspect.signature(getattr(cls, name))}"
        keywords = {p.name for p in inspect.signature(declared).parameters.values()
                    if p.kind is p.KEYWORD_ONLY}
        assert keywords <= set(params) or any(p.kind is p.VAR_KEYWORD for p in params.values()), \
            f"{cls.__name__}.{name} does not take {keywords - set(params)}"


def test_nnsight_and_language_model_instances_implement_the_protocol():
    from glassbox.models.language import LanguageModel

    assert isinstance(glassbox.NNsight(torch.nn.Linear(2, 2)), ModelContract)
    assert isinstance(LanguageModel(tiny_gpt2_path()), ModelContract)
