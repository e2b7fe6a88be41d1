"""Envoy: a tree of light proxies that mirrors a model's submodules.

Offers:
    Envoy        attribute / index access to submodules (and ``rename=`` aliases,
                 see aliases.py); ``.get("a.b.0")``, ``.modules(include_fn, names=)``,
                 ``.named_modules(include_fn)``, ``.path`` / ``.parent`` / ``.root``,
                 ``.device`` / ``.devices``; inside a trace, ``.output``, ``.input``,
                 ``.inputs`` (read and assign), ``.skip(value)``, ``.next()``, ``.source``
                 (the calls in its forward, see source/); calling it runs the module.
                 ``Envoy(module)`` makes a traceable root (an NNsight), as in nnsight.
    SavableTuple, set_save, set_source_factory, set_tracer_finder, set_root_class
                 re-exported from plugs.py: how tracing, source and models.base plug into
                 this module, which cannot import them.

    The seam (glassbox's own modules reach an envoy's internals only through these):
    module_of(envoy)    the torch module it wraps
    path_of(envoy)      its dotted path from the root ("" for the root; ``a.source.op`` for an op)
    display_of(envoy)   how messages name it (``model.layers[0].mlp``)
    name_of(envoy)      its name under its parent ("" for the root)
    parent_of(envoy)    its parent envoy (None for the root)
    root_of(envoy)      the root envoy of its tree (the model wrapper)
    children_of(envoy)  its child envoys by name (read only: attach modules by assignment)
    rename_of(envoy)    the root's ``rename=`` aliases (None if none)
    rebind(envoy, m)    point the envoy and all below it at ``m`` and its submodules (weights
                        loaded after wrapping, an edited copy following its original)
    slots_of(envoy)     the dict in which other modules keep their per-envoy state, one key per
                        owner: "site" (interleave.py: its Site, reused across traces),
                        "source" (source/ops.py: the envoy's Source), "on_install"
                        (source/ops.py: run by the op's Site when a trace installs it).
                        rebind empties it: that state was for the old module.

Users: most of glassbox (tests/test_envoy_seam.py checks that no other module reads the fields).

Why functions and not properties: attribute access on an envoy resolves submodules by name,
and a class attribute hides a submodule of that name (``_RESERVED``). Models do have
submodules called ``module``, ``path``, ``children`` or ``root`` (DataParallel's ``.module``,
peft's ``base_model.model``), so every name the class takes is one a user model loses;
module-level functions take none (fields stay underscored: ``dir()`` shows the model). nnsight's
``.path`` / ``.parent`` / ``.root`` are answered by ``__getattr__``, after the submodules: a
submodule of that name wins. A submodule named like a class attribute (``output``: every BERT
layer has one) is ``.E_output``, with a warning, as in nnsight 0.8 (and ``envoy["output"]``).

Outside a trace an Envoy only forwards to its module: the module itself is
untouched, so the wrapped model runs exactly as the bare one.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from .aliases import aliases_for, check_rename, warn_clashes
from .errors import TraceStateError
from .plugs import PLUGGED, SavableTuple, set_root_class, set_save, set_source_factory, set_tracer_finder
from .plugs import savable as _savable

__all__ = [
    "Envoy", "SavableTuple", "children_of", "display_of", "module_of", "name_of", "parent_of", "path_of",
    "rebind", "rename_of", "root_of", "set_root_class", "set_save", "set_source_factory",
    "set_tracer_finder", "slots_of",
]


class Envoy:
    """Proxy for one module in the tree.

        net = glassbox.NNsight(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()))
        with net.trace(torch.randn(2, 4)):
            hidden = net[0].output.save()
    """

    _RESERVED: frozenset = frozenset()  # names a submodule cannot shadow; see below
    E_PREFIX = "E_"  # a submodule named like one of those is reached as E_<name> (nnsight's prefix)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._RESERVED = _reserved(cls)

    def __new__(cls, module: Any = None, parent: Envoy | None = None, *args: Any, **kwargs: Any) -> Any:
        # nnsight's ``Envoy(module)`` is a traceable root: here that is an NNsight (which is an
        # Envoy). Only a user's call: the tree builds its envoys with a parent, copies without a module.
        root_class = PLUGGED["root"]
        if cls is Envoy and parent is None and isinstance(module, torch.nn.Module) and root_class:
            return object.__new__(root_class)
        return object.__new__(cls)

    def __init__(self, module: torch.nn.Module, parent: Envoy | None = None, name: str = "",
                 rename: dict | None = None, *, at: str | None = None, _clashes: list | None = None) -> None:
        """Wrap ``module`` (and, recursively, its children). ``at`` is the step below ``parent``
        when it is not ``name`` itself (a ``.source`` op sits at ``source.<name>``). ``_clashes``
        collects the E_ names of a tree being built, for one warning per name at its top."""
        d = self.__dict__
        d["_module"] = module
        d["_parent"] = parent
        d["_root"] = parent._root if parent is not None else self
        d["_name"] = name
        d["_slots"] = {}
        if parent is None:
            d["_path"], d["_display"] = "", "model"
            d["_rename"] = check_rename(rename)
        else:
            step = name if at is None else at
            d["_path"] = f"{parent._path}.{step}" if parent._path else step
            shown = f"[{name}]" if at is None and name.isdigit() else f".{step}"
            d["_display"] = parent._display + shown
        children: dict[str, Envoy] = {}
        reserved = type(self)._RESERVED
        clashes = [] if _clashes is None else _clashes
        try:
            for child_name, child in module.named_children():
                envoy = Envoy(child, self, child_name, _clashes=clashes)
                children[child_name] = envoy
                if child_name.isidentifier() and child_name not in reserved:
                    d[child_name] = envoy
                elif child_name in reserved and not child_name.startswith("_"):
                    d[self.E_PREFIX + child_name] = envoy
                    clashes.append((_nnsight_path(self), child_name))
        except ValueError:  # a rename= alias below failed: warn of the moves first, as nnsight
            if _clashes is None and clashes:
                warn_clashes(clashes)
            raise
        if _clashes is None and clashes:
            warn_clashes(clashes)
        d["_by_name"] = children
        d["_children"] = tuple(children.values())  # indexing is on the hot path
        aliases = d["_root"].__dict__.get("_rename")
        if aliases:
            d.update(aliases_for(self, aliases, module, children, d, d["_display"]))

    # ---------------------------------------------------------------- tree

    @property
    def _model(self) -> torch.nn.Module:
        """Alias of ``_module`` (nnsight users write ``model._model``)."""
        return self._module

    def __getattr__(self, name: str) -> Any:
        # Only reached when normal lookup fails (no submodule of that name): nnsight's navigation
        # names, then fall through to the module.
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        navigate = _NAVIGATION.get(name)
        if navigate is not None:
            return navigate(self)
        try:
            return getattr(self.__dict__["_module"], name)
        except AttributeError:
            raise AttributeError(
                f"{self._display} ({type(self._module).__name__}) has no attribute {name!r}; "
                f"its submodules are: {', '.join(self._by_name) or 'none'}"
            ) from None

    def __getitem__(self, key: int | str | slice) -> Any:
        if type(key) is int:  # model.layers[i]: on the per-access path, one read and an index
            try:
                return self._children[key]
            except IndexError:
                pass  # the message below
        children = self._by_name
        if isinstance(key, str):
            if key in children:
                return children[key]
            raise KeyError(f"{self._display} has no submodule {key!r}; it has: {', '.join(children)}")
        values = self._children
        if isinstance(key, slice):
            return list(values[key])
        try:
            return values[key]
        except IndexError:
            raise IndexError(
                f"{self._display} has {len(values)} submodules; index {key} is out of range"
            ) from None

    def __iter__(self) -> Iterator[Envoy]:
        return iter(self._children)

    def __len__(self) -> int:
        return len(self._by_name)

    def __repr__(self) -> str:
        return repr(self._module)

    def __call__(self, *args: Any, hook: bool = False, **kwargs: Any) -> Any:
        """Run the module directly. Inside a trace this is an ad hoc call the trace does not see
        (the logit lens: ``model.lm_head(hidden)``); with ``hook=True`` the trace watches it like
        the model's own calls, so the module's internals are readable and editable by the other
        bodies of the trace (an SAE or adapter attached to the model, applied in an edit)."""
        if hook:
            interleaver = self._root.active
            if interleaver is not None:
                return interleaver.hooked_call(self._module, args, kwargs)
        return self._module(*args, **kwargs)

    def __setattr__(self, name: str, value: Any) -> None:
        # Attaching a module (``model.layer.sae = SAE()``) attaches it to the torch module too
        # and gives it an envoy, so it is traced like any other submodule.
        if isinstance(value, torch.nn.Module) and not name.startswith("_") and name not in self._RESERVED:
            setattr(self._module, name, value)
            envoy = Envoy(value, self, name)
            self._by_name[name] = envoy
            d = self.__dict__
            d["_children"] = tuple(self._by_name.values())
            d[name] = envoy
            return
        object.__setattr__(self, name, value)

    def _at(self, path: str) -> Envoy:
        """The envoy at dotted ``path`` below this one ("" is this one)."""
        node = self
        for part in path.split(".") if path else ():
            node = node._by_name[part]
        return node

    def modules(self, include_fn: Callable[[Envoy], bool] | None = None,
                names: bool = False) -> list[Any]:
        """This envoy and all below it, as nnsight 0.8 lists them: each module's children before
        it (so this envoy comes last); with ``include_fn``, only those it returns True for; with
        ``names=True``, ``(path, envoy)`` pairs (``.path``: ``"model.transformer.h.0"``)."""
        out: list[Any] = []
        _post_order(self, include_fn, names, out)
        return out

    def named_modules(self, include_fn: Callable[[Envoy], bool] | None = None) -> list[tuple[str, Envoy]]:
        """``modules(include_fn, names=True)``: ``(path, envoy)`` pairs, ``model.get(path)``
        finds each (torch's own names: ``model._module.named_modules()``)."""
        return self.modules(include_fn, names=True)

    def get(self, path: str) -> Any:
        """What dotted ``path`` names below this one: submodules (names, indices, aliases,
        ``E_`` names), then optionally a parameter, buffer or plain value of the last module
        (``model.get("transformer.h.0.attn.c_attn.weight")``), or inside a trace ``.output`` /
        ``.input`` / ``.inputs`` (``model.get("transformer.h.0.mlp.output")``). A path may start
        with this envoy's ``.path`` (the names ``named_modules`` gives). Nothing else is
        reached (no methods, no private fields), so remote code can use it too."""
        parts = [p for p in path.split(".") if p]
        try:
            return self._walk(parts, path)
        except AttributeError:
            own = _nnsight_path(self).split(".")
            if parts[:len(own)] != own:
                raise
        return self._walk(parts[len(own):], path)

    def _walk(self, parts: list[str], path: str) -> Any:
        node: Envoy = self
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if last and part in ("output", "input", "inputs"):  # the value, as nnsight's get
                return getattr(node, part)
            found = node._by_name.get(part)
            if found is None:
                alias = node.__dict__.get(part)  # rename= aliases, E_ names
                found = alias if isinstance(alias, Envoy) else None
            if found is not None:
                node = found
                continue
            value = _plain_attribute(node._module, part) if last else _NO_VALUE
            if value is not _NO_VALUE:
                return value
            raise AttributeError(
                f"{node._display} has no submodule {part!r} (in {path!r}); its submodules are: "
                f"{', '.join(node._by_name) or 'none'}"
            )
        return node

    @property
    def device(self) -> torch.device | None:
        """The device of this module's first parameter (else first buffer; None if it has neither)."""
        for tensors in (self._module.parameters(), self._module.buffers()):
            for tensor in tensors:
                return tensor.device
        return None

    @property
    def devices(self) -> set[torch.device]:
        """Every device this module's parameters and buffers are on (a model split by
        ``device_map`` spans several)."""
        found = {p.device for p in self._module.parameters()}
        return found | {b.device for b in self._module.buffers()}

    def _module_method(name: str):
        def method(self: Envoy, *args: Any, **kwargs: Any) -> Envoy:
            getattr(self._module, name)(*args, **kwargs)
            return self

        method.__name__ = name
        method.__doc__ = f"Call ``module.{name}(...)`` and return this envoy."
        return method

    to, cuda, cpu, eval, train, float, half, bfloat16, double, requires_grad_ = map(_module_method, (
        "to", "cuda", "cpu", "eval", "train", "float", "half", "bfloat16", "double", "requires_grad_"))
    del _module_method

    @property
    def iter(self) -> Any:
        """Deprecated (as in nnsight 0.8): ``tracer.iter`` of the current trace."""
        warnings.warn("model.iter is deprecated; use tracer.iter instead.", DeprecationWarning, stacklevel=2)
        return self._tracer("iter").iter

    def all(self) -> Any:
        """Deprecated (as in nnsight 0.8): ``tracer.all()`` of the current trace."""
        warnings.warn("model.all() is deprecated; use tracer.all() instead.", DeprecationWarning,
                      stacklevel=2)
        return self._tracer("all()").all()

    def _tracer(self, what: str) -> Any:
        finder = PLUGGED["tracer"]
        tracer = finder() if finder is not None else None
        if tracer is None:
            raise TraceStateError(f"{self._display}.{what} is only available inside `with model.trace(...)`")
        return tracer

    # ---------------------------------------------------------------- values

    def _interleaver(self, what: str) -> Any:
        interleaver = self._root.active
        if interleaver is None:
            raise TraceStateError(
                f"{self._display}.{what} is only available inside `with model.trace(...)` "
                "(or model.generate(...)); outside a trace, run the model normally."
            )
        return interleaver

    @property
    def output(self) -> Any:
        """The module's output at its next call (or the current one, if the
        trace is already there). Assign to replace it; edit it in place."""
        interleaver = self._root.active  # inlined _interleaver: this is the per-access path
        if interleaver is None:
            interleaver = self._interleaver("output")
        value = interleaver.request(self, "output")
        return SavableTuple(value) if type(value) is tuple else value

    @output.setter
    def output(self, value: Any) -> None:
        self._interleaver("output").replace(self, "output", value)

    @property
    def inputs(self) -> tuple[tuple, dict]:
        """``(args, kwargs)`` the module is called with."""
        args, kwargs = self._interleaver("inputs").request(self, "input")
        return SavableTuple((SavableTuple(args), kwargs))

    @inputs.setter
    def inputs(self, value: tuple[tuple, dict]) -> None:
        if not (isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], dict)):
            raise TypeError(".inputs must be assigned a pair (args_tuple, kwargs_dict)")
        self._interleaver("inputs").replace(self, "input", (tuple(value[0]), dict(value[1])))

    @property
    def input(self) -> Any:
        """The first argument the module is called with (positional, else keyword)."""
        args, kwargs = self._interleaver("input").request(self, "input")
        if args:
            return _savable(args[0])
        if kwargs:
            return _savable(next(iter(kwargs.values())))
        return None

    @input.setter
    def input(self, value: Any) -> None:
        interleaver = self._interleaver("input")
        args, kwargs = interleaver.request(self, "input")
        if args:
            new = ((value, *args[1:]), kwargs)
        elif kwargs:
            first = next(iter(kwargs))
            new = (args, {**kwargs, first: value})
        else:
            new = ((value,), kwargs)
        interleaver.replace(self, "input", new)

    @property
    def source(self) -> Any:
        """The calls inside this module's forward, each an envoy with ``.output`` / ``.input``
        (``source.self_q_proj_0``); ``print`` it for the listing. Inside a trace, touch it before
        the model enters the module. See glassbox/source/."""
        factory = PLUGGED["source"]
        assert factory is not None, "glassbox.source registers it on import"
        return factory(self)

    def skip(self, value: Any) -> None:
        """Do not run this module at its next call; use ``value`` as its output."""
        self._interleaver("skip()").skip(self, value)

    def next(self) -> _NextCall:
        """Address the module's next call even if the trace is at the current one."""
        return _NextCall(self)


class _NextCall:
    """``envoy.next()``: ``.output`` / ``.input`` of the following call."""

    def __init__(self, envoy: Envoy) -> None:
        self._envoy = envoy

    @property
    def output(self) -> Any:
        return _savable(self._envoy._interleaver("output").request(self._envoy, "output", fresh=True))

    @property
    def input(self) -> Any:
        args, kwargs = self._envoy._interleaver("input").request(self._envoy, "input", fresh=True)
        return _savable(args[0] if args else next(iter(kwargs.values()), None))


# ---------------------------------------------------------------- navigation

_NO_VALUE = object()
_PLAIN = (torch.Tensor, bool, int, float, str, torch.dtype, torch.device)


def _nnsight_path(envoy: Envoy) -> str:
    """nnsight's ``envoy.path``: ``"model"`` for the root, ``"model.transformer.h.0"`` below."""
    return f"model.{envoy._path}" if envoy._path else "model"


# what ``envoy.path`` / ``.parent`` / ``.root`` answer where no submodule has the name
_NAVIGATION: dict[str, Callable[[Envoy], Any]] = {
    "path": _nnsight_path,
    "parent": lambda envoy: envoy._parent,
    "root": lambda envoy: envoy._root,
}


def _post_order(envoy: Envoy, include_fn: Callable[[Envoy], bool] | None, names: bool, out: list) -> None:
    for child in envoy._children:
        _post_order(child, include_fn, names, out)
    if include_fn is None or include_fn(envoy):
        out.append((_nnsight_path(envoy), envoy) if names else envoy)


def _plain_attribute(module: torch.nn.Module, name: str) -> Any:
    """``module.name`` if it is a parameter, a buffer (None included) or a plain value (tensor,
    number, string, dtype, device): what ``get`` may end on. Else ``_NO_VALUE``."""
    if name.startswith("_"):
        return _NO_VALUE
    if name in module._parameters or name in module._buffers:
        return getattr(module, name)
    value = getattr(module, name, _NO_VALUE)
    return value if isinstance(value, _PLAIN) else _NO_VALUE


# ---------------------------------------------------------------- the seam
# Plain functions over the fields Envoy.__init__ sets (see the module docstring for why not
# properties). Plain attribute reads, so a subclass that builds its tree lazily (VLLM: reading a
# field starts the engine, through __getattr__) keeps working. The per-access path
# (interleave.request) calls none of them: the interleaver finds Sites by envoy, and a Site keeps
# the envoy's module and parent.


def module_of(envoy: Envoy) -> torch.nn.Module:
    """The torch module ``envoy`` wraps."""
    return envoy._module


def path_of(envoy: Envoy) -> str:
    """``envoy``'s dotted path from its root ("" for the root), as ``get_submodule`` takes it."""
    return envoy._path


def display_of(envoy: Envoy) -> str:
    """How messages name ``envoy``: ``model.layers[0].mlp``."""
    return envoy._display


def name_of(envoy: Envoy) -> str:
    """``envoy``'s name under its parent ("" for the root)."""
    return envoy._name


def parent_of(envoy: Envoy) -> Envoy | None:
    """``envoy``'s parent (None for the root)."""
    return envoy._parent


def root_of(envoy: Envoy) -> Envoy:
    """The root of ``envoy``'s tree: the model wrapper."""
    return envoy._root


def children_of(envoy: Envoy) -> Mapping[str, Envoy]:
    """``envoy``'s children by name, in module order. Read only: attach a module by assigning it
    (``envoy.sae = SAE()``), which keeps the torch module and the tree in step."""
    return envoy._by_name


def rename_of(envoy: Envoy) -> dict | None:
    """The ``rename=`` aliases of ``envoy``'s root (None when it has none)."""
    return envoy._root.__dict__.get("_rename") or None


def rebind(envoy: Envoy, module: torch.nn.Module) -> None:
    """Point ``envoy`` at ``module`` and each envoy below it at the submodule of ``module`` at
    the same path (the tree's shape is kept: ``module`` must have those submodules). For weights
    loaded after wrapping, and an edited copy following its original. Each envoy's slots are
    emptied: what other modules kept there (a Site, a Source) was for the old module."""
    start = len(envoy._path) + 1 if envoy._path else 0
    for node in envoy.modules():
        d = node.__dict__
        path = node._path[start:]
        d["_module"] = module.get_submodule(path) if path else module
        d["_slots"].clear()


def slots_of(envoy: Envoy) -> dict[str, Any]:
    """The dict in which other modules keep per-envoy state, one key per owner (listed in the
    module docstring). Owners may keep the dict itself: it lives as long as the envoy."""
    return envoy._slots


def _reserved(klass: type) -> frozenset:
    return frozenset(name for k in klass.__mro__ if k is not object for name in vars(k)
                     if not name.startswith("__"))


Envoy._RESERVED = _reserved(Envoy)
