"""``rename=``: extra names for modules, so one script reads every architecture.

Offers:
    check_rename(rename)        validate a ``rename`` mapping once, at construction
    bind_aliases(envoy, rename) bind the aliases that resolve from ``envoy`` as attributes

``LanguageModel(path, rename={"model.layers": "layers", "transformer.h": "layers"})``
makes ``model.layers[0]`` the first decoder block of a Llama and of a GPT-2 alike.
Rules (nnsight 0.8's):
- a key is a dotted path relative to an envoy, or a module class; a value is
  one alias or a list of aliases;
- every envoy of the tree tries every key: a one-part key (``"self_attn"``)
  binds on each envoy that has such a child, a dotted key binds where it
  resolves (``"model.layers"`` from the root);
- a key that resolves nowhere on an envoy is skipped there (one mapping
  serves several architectures); a class key that matches two children of one
  envoy, or an alias that would hide a child, an envoy attribute or an
  attribute of the module, is an error: an alias names one module and never
  makes another unreachable.

An alias is the same Envoy object under a second name (not a copy, not a
child), so iteration, ``modules()`` and paths are unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .envoy import Envoy


def check_rename(rename: Any) -> dict:
    """``rename`` as a dict of key -> tuple of aliases (TypeError / ValueError if malformed)."""
    if rename is None:
        return {}
    if not isinstance(rename, dict):
        got = type(rename).__name__
        raise TypeError(f"rename= takes a dict like {{'model.layers': 'layers'}}, got {got}")
    checked = {}
    for key, aliases in rename.items():
        if not (isinstance(key, type) or (isinstance(key, str) and key.strip("."))):
            raise TypeError(f"rename key {key!r} must be a dotted module path or a module class")
        names = (aliases,) if isinstance(aliases, str) else tuple(aliases)
        for alias in names:
            if not (isinstance(alias, str) and alias.isidentifier()):
                raise ValueError(f"rename alias {alias!r} for {key!r} must be a Python identifier")
        checked[key] = names
    return checked


def _targets(envoy: Envoy, key: Any) -> list[Envoy]:
    if isinstance(key, type):
        return [child for child in envoy._children.values() if isinstance(child._module, key)]
    node = envoy
    for part in key.strip(".").split("."):
        node = node._children.get(part)
        if node is None:
            return []
    return [node]


def bind_aliases(envoy: Envoy, rename: dict) -> None:
    """Bind, on ``envoy``, every alias of ``rename`` whose key resolves from it."""
    d = envoy.__dict__
    for key, aliases in rename.items():
        found = _targets(envoy, key)
        shown = key.__name__ if isinstance(key, type) else repr(key)
        if len(found) > 1:
            raise ValueError(
                f"rename key {shown} matches {len(found)} submodules of {envoy._display} "
                f"({', '.join(t._name for t in found)}); an alias names one module: key those by path"
            )
        if not found:
            continue
        target = found[0]
        for alias in aliases:
            if d.get(alias) is target:
                continue  # already this module (an alias equal to its own name, or tied modules)
            if alias in d or alias in envoy._children:
                hidden = "an alias or submodule of that name"
            elif any(alias in vars(k) for k in type(envoy).__mro__):
                hidden = f"the envoy attribute .{alias}"
            elif hasattr(envoy._module, alias):
                hidden = f"the attribute .{alias} of {type(envoy._module).__name__}"
            else:
                d[alias] = target
                continue
            raise ValueError(
                f"rename alias {alias!r} for {shown} would hide {hidden} on {envoy._display}; "
                "choose another alias"
            )
