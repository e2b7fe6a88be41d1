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
  makes another unreachable;
- keys are written against attributes: a submodule moved to ``E_output`` (its name is one an
  envoy serves) is keyed ``"block.E_output"``; ``"block.output"`` names the served value and is
  an error ("outside of interleaving", as nnsight's getattr there), and so is an alias that
  claims a moved name ("already bound here from 'output'").

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


_SERVED = ("output", "input", "inputs")  # an envoy's values during a trace, not submodules


def _child(node: Envoy, name: str) -> Envoy | None:
    try:
        return node[name]  # Envoy[str]: a child by its module name, never an alias
    except KeyError:
        return None


def _targets(module: Any, children: Mapping[str, Envoy], key: Any, reserved: frozenset,
             prefix: str) -> list[tuple[str, Envoy]]:
    if isinstance(key, type):  # the child modules are the child envoys' modules, name for name
        return [(name, children[name]) for name, child in module.named_children() if isinstance(child, key)]
    parts = key.strip(".").split(".")
    node: Envoy | None = None
    for i, part in enumerate(parts):
        def find(name: str, node: Envoy | None = node) -> Envoy | None:
            return children.get(name) if node is None else _child(node, name)

        if part in reserved and (part in _SERVED or find(part) is not None):
            moved = ".".join([*parts[:i], prefix + part, *parts[i + 1:]])
            raise ValueError(
                f"rename key {key!r}: .{part} is the envoy's {part}, a value served only inside a "
                f"trace (reading it outside of interleaving fails), not a submodule; a submodule "
                f"named {part!r} is .{prefix}{part}: key it as {moved!r}"
            )
        if part.startswith(prefix) and part[len(prefix):] in reserved:
            part = part[len(prefix):]  # E_output: the submodule named output, moved aside
        node = find(part)
        if node is None:
            return []
    assert node is not None
    return [(parts[0], node)]


def aliases_for(envoy: Envoy, rename: dict, module: Any, children: Mapping[str, Envoy],
                taken: Mapping[str, Any], where: str) -> dict[str, Envoy]:
    """The aliases of ``rename`` whose key resolves from ``envoy`` (which wraps ``module``, has
    ``children`` and already has the attributes ``taken``; ``where`` names it in errors), as
    alias -> envoy; Envoy.__init__ binds them. ValueError if one would hide another name."""
    bound: dict[str, Envoy] = {}
    for key, aliases in rename.items():
        found = _targets(module, children, key, type(envoy)._RESERVED, type(envoy).E_PREFIX)
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
            moved = alias[len(envoy.E_PREFIX):] if alias.startswith(envoy.E_PREFIX) else None
            if moved in children and taken.get(alias) is children[moved]:
                raise ValueError(
                    f"rename alias {alias!r} for {shown} on {where}: {alias!r} is already bound here "
                    f"from {moved!r} (the submodule named {moved!r}, moved to .{alias}); choose another alias"
                )
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
