"""``rename=``: extra names for modules, so one script reads every architecture.

Offers:
    check_rename(rename)        validate a ``rename`` mapping once, at construction
    aliases_for(envoy, ...)     the aliases that resolve from ``envoy`` (Envoy.__init__ binds
                                them as attributes; it hands over what they are checked against,
                                so this module reads no envoy internals and imports no envoy)
    warn_clashes(clashes)       nnsight's warning for submodules named like an envoy attribute
                                (BERT's ``output``), which Envoy.__init__ binds as ``E_output``

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

import warnings
from collections.abc import Mapping
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


def _targets(module: Any, children: Mapping[str, Envoy], key: Any) -> list[tuple[str, Envoy]]:
    if isinstance(key, type):  # the child modules are the child envoys' modules, name for name
        return [(name, children[name]) for name, child in module.named_children() if isinstance(child, key)]
    first, *rest = key.strip(".").split(".")
    node = children.get(first)
    try:
        for part in rest:
            node = node[part] if node is not None else None  # Envoy[str]: a child, never an alias
    except KeyError:
        return []
    return [] if node is None else [(first, node)]


def aliases_for(envoy: Envoy, rename: dict, module: Any, children: Mapping[str, Envoy],
                taken: Mapping[str, Any], where: str) -> dict[str, Envoy]:
    """The aliases of ``rename`` whose key resolves from ``envoy`` (which wraps ``module``, has
    ``children`` and already has the attributes ``taken``; ``where`` names it in errors), as
    alias -> envoy; Envoy.__init__ binds them. ValueError if one would hide another name."""
    bound: dict[str, Envoy] = {}
    for key, aliases in rename.items():
        found = _targets(module, children, key)
        shown = key.__name__ if isinstance(key, type) else repr(key)
        if len(found) > 1:
            raise ValueError(
                f"rename key {shown} matches {len(found)} submodules of {where} "
                f"({', '.join(name for name, _ in found)}); an alias names one module: key those by path"
            )
        if not found:
            continue
        target = found[0][1]
        for alias in aliases:
            current = bound.get(alias, taken.get(alias))
            if current is target:
                continue  # already this module (an alias equal to its own name, or tied modules)
            if alias in bound or alias in taken or alias in children:
                hidden = "an alias or submodule of that name"
            elif any(alias in vars(k) for k in type(envoy).__mro__):
                hidden = f"the envoy attribute .{alias}"
            elif hasattr(module, alias):
                hidden = f"the attribute .{alias} of {type(module).__name__}"
            else:
                bound[alias] = target
                continue
            raise ValueError(
                f"rename alias {alias!r} for {shown} would hide {hidden} on {where}; "
                "choose another alias"
            )
    return bound


def warn_clashes(clashes: list[tuple[str, str]]) -> None:
    """nnsight's warning for submodules moved to ``E_<name>``: one per name (BERT has 2 per layer)."""
    for name in dict.fromkeys(n for _, n in clashes):
        where = [f"'{path}'" for path, n in clashes if n == name]
        owners = f"Module {where[0]} has" if len(where) == 1 else \
            f"Modules {', '.join(where[:3])}{', ...' if len(where) > 3 else ''} ({len(where)}) have"
        warnings.warn(f"{owners} a submodule named '{name}', which glassbox already serves on every "
                      f"module. The submodule is '.E_{name}' there; '.{name}' stays the envoy's {name}.",
                      stacklevel=4)
