"""Runtime guards for sandboxed code: what it may read, call, import and write.

Offers:
    SandboxError      raised at the user's line when the code tries something the sandbox forbids
    Policy(protected, print_fn)
        .getattr / .getitem / .write / .inplace     the guards RestrictedPython's compiled code calls
        .aug_item / .aug_attr                       ``x[k] op= v`` and ``x.a op= v``
        .import_module                              ``__import__``: whitelisted modules, as ModuleViews
        .overlaps(tensor)                           does it share memory with a protected tensor?
    (the module whitelist and ModuleView live in ``whitelist.py``)

The policy (why each rule exists) is written out in ``compile.py``'s docstring; this file
only implements it. Every denial raises SandboxError, never AttributeError.
"""

from __future__ import annotations

import bisect
import builtins
import functools
import importlib
import inspect
import itertools
import operator
import string
import types
from collections.abc import Callable, Iterable
from typing import Any

import torch

from ...envoy import Envoy, module_of
from ...errors import SandboxError
from ...models.generation import call_through
from .offloaded import protected_parts
from .whitelist import SPECS, ModuleView, dangerous, importable_modules

_MISSING = object()


def deny(message: str) -> SandboxError:
    return SandboxError(message)


# ---------------------------------------------------------------- name rules

# Introspection handles that lead from any object to frames, code and globals.
_INTROSPECTION_PREFIXES = ("f_", "gi_", "cr_", "ag_", "tb_", "co_")
_INTROSPECTION = frozenset({"mro", "fget", "fset", "fdel", "getter", "setter", "deleter", "with_traceback"})

# Method names that mutate the state of long-lived objects (configs, tokenizers,
# generators); allowed on the user's own lists, dicts and sets.
_STATE_MUTATORS = ("set_", "add_", "update", "reset", "clear", "pop", "remove", "insert", "append",
                   "extend", "setdefault", "resize", "tie_", "init_", "post_init", "enable_", "disable_",
                   "no_", "train")
_USER_CONTAINERS = (list, dict, set)

# Tensor attributes that escape the tensor abstraction: raw memory, numpy
# aliases (writable views of weights), storage rebinding, arbitrary callbacks.
_TENSOR_BLOCKED = frozenset({
    "numpy", "storage", "untyped_storage", "typed_storage", "set_", "share_memory_", "module_load",
    "apply_", "map_", "map2_", "data_ptr", "from_file",
    # uninitialised memory: it may still hold values of the requests sharing this forward pass
    "new_empty", "new_empty_strided", "resize_", "resize_as_",
})

# Module methods that only read. Everything else callable on a served module is refused.
_MODULE_READ = frozenset({
    "forward", "parameters", "named_parameters", "buffers", "named_buffers", "children",
    "named_children", "modules", "named_modules", "state_dict", "extra_repr", "num_parameters",
})

# Envoy API open to remote code. ``to``/``cuda``/``half``/``train``/``edit``... change the
# served model for every later job, so they stay closed.
_ENVOY_API = frozenset({"output", "input", "inputs", "skip", "next", "modules", "trace", "session",
                        "generate", "tokenizer", "config", "device", "dtype", "source",
                        # navigation (get walks submodules and aliases, then ends on a parameter,
                        # buffer or plain value) and generate's output
                        "get", "named_modules", "devices", "generator", "path", "parent", "root",
                        # nnsight's deprecated spellings of tracer.iter / tracer.all()
                        "iter", "all"})
_ENVOY_WRITABLE = frozenset({"output", "input", "inputs"})
_LOCAL_ONLY_KWARGS = ("remote", "backend", "blocking")

_INPLACE_OPS: dict[str, Callable[[Any, Any], Any]] = {
    "+=": operator.iadd, "-=": operator.isub, "*=": operator.imul, "/=": operator.itruediv,
    "//=": operator.ifloordiv, "%=": operator.imod, "**=": operator.ipow, "<<=": operator.ilshift,
    ">>=": operator.irshift, "|=": operator.ior, "^=": operator.ixor, "&=": operator.iand,
    "@=": operator.imatmul,
}


def _kind(obj: Any) -> str:
    return type(obj).__name__


# ---------------------------------------------------------------- the policy


class Policy:
    """The guards one sandboxed job runs under.

        policy = Policy(protected=[module_of(net)])
        policy.getattr(torch.ones(2), "sum")()           # fine
        policy.getattr(module_of(net)[0].weight, "zero_")  # SandboxError
    """

    def __init__(self, protected: Iterable[Any] = (), print_fn: Callable[[str], None] | None = None) -> None:
        self.print_fn = print_fn
        self._spans: list[tuple[int, int]] = []
        self._starts: list[int] = []
        self._module_ids: set[int] = set()
        self._modules: list[torch.nn.Module] = []  # keeps ids valid
        self._views: dict[str, ModuleView] = {}
        self._signatures: dict[int, tuple[tuple[str, int], ...]] = {}
        self.protect(protected)

    def refuse(self, message: str) -> SandboxError:
        """The error for a denial (ModuleView raises through this)."""
        return SandboxError(message)

    # ------------------------------------------------------------ protected set

    def protect(self, values: Iterable[Any]) -> None:
        """Add tensors, modules or envoys (all their weights and submodules) to the protected set."""
        spans = list(self._spans)
        for value in values:
            self._collect(value, spans)
        spans.sort()
        merged: list[tuple[int, int]] = []
        for start, end in spans:
            if merged and start <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
            else:
                merged.append((start, end))
        self._spans = merged
        self._starts = [s for s, _ in merged]

    def _collect(self, value: Any, spans: list[tuple[int, int]]) -> None:
        if isinstance(value, Envoy):
            value = module_of(value)
        if isinstance(value, torch.nn.Module):
            if id(value) in self._module_ids:
                return  # protected already, with all it holds
            modules, tensors = protected_parts(value)
            for module in modules:
                if id(module) not in self._module_ids:
                    self._module_ids.add(id(module))
                    self._modules.append(module)
            for tensor in tensors:
                self._collect(tensor, spans)
        elif isinstance(value, torch.Tensor):
            if value.device.type == "meta":
                raise ValueError(
                    "a protected tensor is on the meta device: load the model's weights before "
                    "building the sandbox, or they cannot be protected"
                )
            span = _span(value)
            if span is not None:
                spans.append(span)
        elif isinstance(value, (list, tuple)):
            for item in value:
                self._collect(item, spans)
        else:
            raise TypeError(f"protected= takes tensors, modules and envoys, got {_kind(value)}")

    def overlaps(self, tensor: torch.Tensor) -> bool:
        """Does ``tensor`` share memory with a protected tensor? Tensors whose memory
        cannot be located (functorch wrappers) count as protected: fail closed."""
        try:
            span = _span(tensor)
        except (RuntimeError, NotImplementedError, TypeError):
            return bool(self._spans)
        if span is None:
            return False
        start, end = span
        i = bisect.bisect_right(self._starts, end - 1) - 1
        return i >= 0 and self._spans[i][1] > start

    def module_protected(self, module: torch.nn.Module) -> bool:
        if id(module) in self._module_ids:
            return True
        return any(id(m) in self._module_ids for m in module.modules()) or any(
            self.overlaps(t) for t in itertools.chain(module.parameters(), module.buffers())
        )

    def check_tensors(self, what: str, values: Iterable[Any]) -> None:
        for value in values:
            items = value if isinstance(value, (list, tuple)) else (value,)
            for item in items:
                if isinstance(item, torch.Tensor) and self.overlaps(item):
                    raise deny(
                        f"{what} would modify a model weight: parameters and buffers are read-only in "
                        "remote code (work on a copy, e.g. w = weight.clone())"
                    )

    def check_not_weight(self, what: str, value: Any) -> None:
        """An activation must not BE a weight: the model may edit activations in place
        (ReLU(inplace=True), ``x += residual``), which would then edit the weight."""
        for item in _tensors_in(value):
            if self.overlaps(item):
                raise deny(f"{what}: this value shares memory with a model weight; pass a copy (w.clone())")

    def _checked_skip(self, skip: Callable) -> Callable:
        def checked(value: Any) -> Any:
            self.check_not_weight("skip(...)", value)
            return skip(value)

        return checked

    # ------------------------------------------------------------ reading

    def getattr(self, obj: Any, name: str, default: Any = _MISSING) -> Any:
        """The ``_getattr_`` guard (also the sandbox's ``getattr`` builtin)."""
        if type(name) is not str:
            raise TypeError(f"attribute name must be str, not {_kind(name)}")
        self._check_attr(obj, name)
        try:
            value = getattr(obj, name)
        except AttributeError:
            if default is _MISSING:
                raise
            return default
        return self._filter(obj, name, value)

    def hasattr(self, obj: Any, name: str) -> bool:
        try:
            self.getattr(obj, name)
        except AttributeError:
            return False
        return True

    def getitem(self, obj: Any, key: Any) -> Any:
        value = obj[key]
        if isinstance(value, (types.ModuleType, *_UNREACHABLE_TYPES)) or _is_forbidden_builtin(value):
            raise deny(f"{_kind(obj)}[...] leads to a {_kind(value)}, which remote code cannot use")
        return value

    def _check_attr(self, obj: Any, name: str) -> None:
        if name.startswith("_"):
            raise deny(
                f"cannot access .{name}: names starting with '_' are private and not available in remote code"
            )
        if name in _INTROSPECTION or name.startswith(_INTROSPECTION_PREFIXES):
            raise deny(f"cannot access .{name}: introspection attributes are not available in remote code")
        if isinstance(obj, ModuleView):
            return  # the view applies its module's own whitelist
        if isinstance(obj, types.ModuleType) or isinstance(obj, _UNREACHABLE_TYPES):
            raise deny(f"{_kind(obj)} objects cannot be used in remote code")
        if isinstance(obj, torch.Tensor):
            self._check_tensor_attr(obj, name)
        elif isinstance(obj, type):
            self._check_class_attr(obj, name)
        elif isinstance(obj, Envoy):
            self._check_envoy_attr(obj, name)
        elif isinstance(obj, torch.nn.Module):
            self._check_module_attr(obj, name, self.module_protected(obj))
        elif isinstance(obj, str) and name in ("format", "format_map"):
            _check_format(obj)
        elif dangerous(name) and not (name == "save" and _glassbox_save(obj)):
            raise deny(f"cannot use .{name} of {_kind(obj)} in remote code (no files, hooks or processes)")
        elif name.startswith(_STATE_MUTATORS) and not isinstance(obj, _USER_CONTAINERS):
            raise deny(
                f"cannot call .{name} on {_kind(obj)}: objects shared by every job (configs, "
                "tokenizers, ...) are read-only in remote code"
            )

    def _check_tensor_attr(self, tensor: torch.Tensor, name: str) -> None:
        if name in _TENSOR_BLOCKED:
            raise deny(
                f"tensor.{name} is not available in remote code (it exposes raw memory); "
                "use tensor operations, .tolist() or .item() instead"
            )
        if name == "save":
            return
        if dangerous(name):
            raise deny(f"tensor.{name} is not available in remote code")
        if name.endswith("_") and self.overlaps(tensor):
            raise deny(
                f".{name}() would modify a model weight: parameters and buffers are read-only in "
                "remote code (work on a copy, e.g. w = weight.clone())"
            )

    def _check_class_attr(self, cls: type, name: str) -> None:
        # Unbound methods take any object as `self`: judge them as if called on a protected instance.
        if name.endswith("_") or dangerous(name) or name.startswith(_STATE_MUTATORS):
            raise deny(f"{cls.__name__}.{name} cannot be used through the class in remote code")
        if issubclass(cls, torch.Tensor) and name in _TENSOR_BLOCKED:
            raise deny(f"{cls.__name__}.{name} is not available in remote code")
        if issubclass(cls, str) and name in ("format", "format_map"):
            raise deny("str.format cannot be called through the class; use an f-string")
        if issubclass(cls, (torch.nn.Module, Envoy)) and name not in _MODULE_READ:
            if callable(inspect.getattr_static(cls, name, None)):
                raise deny(f"{cls.__name__}.{name} cannot be used through the class in remote code")

    def _check_envoy_attr(self, envoy: Envoy, name: str) -> None:
        if name in _ENVOY_API or name in envoy.__dict__:
            return
        if hasattr(type(envoy), name):
            raise deny(
                f"model.{name} is not available in remote code: the served model is shared by every "
                "job (read .output / .input, assign them, or call .skip())"
            )
        self._check_module_attr(module_of(envoy), name, True)

    def _check_module_attr(self, module: torch.nn.Module, name: str, protected: bool) -> None:
        if dangerous(name):
            raise deny(f"module.{name} is not available in remote code (no files, hooks or processes)")
        if not protected or name in _MODULE_READ or name.startswith("get_"):
            return
        value = inspect.getattr_static(module, name, None)
        if callable(value) and not isinstance(value, (torch.nn.Module, torch.Tensor)):
            raise deny(
                f"{type(module).__name__}.{name}() is not available in remote code: it could change the "
                "served model, which every job shares (reading attributes and calling the module are fine)"
            )

    def _filter(self, obj: Any, name: str, value: Any) -> Any:
        if isinstance(value, types.ModuleType) or isinstance(value, _UNREACHABLE_TYPES):
            raise deny(f"{_kind(obj)}.{name} leads to a {_kind(value)}, which remote code cannot use")
        if (isinstance(value, type) and value in _UNREACHABLE_CLASSES) or _is_forbidden_builtin(value):
            raise deny(f"{_kind(obj)}.{name} leads to {value.__name__}, which remote code cannot use")
        owner = value.__self__ if isinstance(value, _METHOD_TYPES) else None
        if isinstance(owner, torch.Tensor) and owner is not obj:
            # A method of a tensor reached through an object that forwards attributes
            # (a tensor-like model output): judge it as the tensor's own attribute.
            self._check_tensor_attr(owner, name)
        if isinstance(obj, Envoy):
            if name in ("trace", "session", "generate"):
                return _local_only(value, name)
            if name == "skip":
                return self._checked_skip(value)
        if name == "log" and _is_tracer(obj):
            return self.print_values
        return value

    # ------------------------------------------------------------ writing

    def write(self, obj: Any) -> Any:
        """The ``_write_`` guard: the target of ``obj.a = v`` / ``obj[k] = v`` / ``del ...``."""
        if type(obj) in _USER_CONTAINERS:
            return obj
        return _Writer(self, obj)

    def check_setitem(self, obj: Any, key: Any) -> None:
        if isinstance(obj, torch.Tensor):
            self.check_tensors("this assignment", (obj,))
        elif isinstance(obj, Envoy):
            raise deny("submodules of the served model cannot be replaced in remote code")
        elif isinstance(obj, torch.nn.Module):
            if self.module_protected(obj):
                raise deny("submodules of the served model cannot be replaced in remote code")
        elif not isinstance(obj, (list, dict)):
            raise deny(f"cannot assign items of {_kind(obj)} in remote code")

    def check_setattr(self, obj: Any, name: str, deleting: bool = False) -> None:
        verb = "delete" if deleting else "assign"
        if name.startswith("_"):
            raise deny(f"cannot {verb} .{name}: private names are not available in remote code")
        if isinstance(obj, Envoy):
            if deleting or name not in _ENVOY_WRITABLE:
                raise deny(
                    f"cannot {verb} model.{name}: only .output, .input and .inputs of the served model "
                    "can be assigned in remote code"
                )
        elif isinstance(obj, torch.Tensor):
            self.check_tensors(f"{verb} tensor.{name}", (obj,))
            if name == "data":
                raise deny("cannot assign tensor.data in remote code; assign the variable instead")
        elif isinstance(obj, torch.nn.Module):
            if self.module_protected(obj):
                raise deny(f"cannot {verb} .{name} of the served model: it is shared by every job")
        elif isinstance(obj, (ModuleView, type)):
            raise deny(f"cannot {verb} .{name}: modules and classes are read-only in remote code")
        elif not isinstance(obj, dict):  # dict subclasses: ModelOutput and friends, made per run
            raise deny(f"cannot {verb} attributes of {_kind(obj)} in remote code")

    def inplace(self, op: str, target: Any, value: Any) -> Any:
        """The ``_inplacevar_`` guard: ``target op= value``."""
        if isinstance(target, torch.Tensor):
            self.check_tensors(f"`{op}`", (target,))
        try:
            fn = _INPLACE_OPS[op]
        except KeyError:
            raise deny(f"unknown augmented assignment {op!r}") from None
        return fn(target, value)

    def aug_item(self, obj: Any, key: Any, op: str, value: Any) -> None:
        """``obj[key] op= value``, evaluating ``obj`` and ``key`` once, as Python does."""
        result = self.inplace(op, self.getitem(obj, key), value)
        self.write(obj)[key] = result

    def aug_attr(self, obj: Any, name: str, op: str, value: Any) -> None:
        """``obj.name op= value``."""
        result = self.inplace(op, self.getattr(obj, name), value)
        setattr(self.write(obj), name, result)

    # ------------------------------------------------------------ calls and imports

    def guard_call(self, fn: Callable, where: str, mutates_args: bool = False) -> Callable:
        """Wrap a library function so that it refuses to write into protected tensors:
        through ``out=``, ``inplace=True``, ``max_norm=`` (embedding renormalises its
        weight in place), running statistics (batch / instance norm), or because it is
        an in-place ``name_`` (or ``mutates_args``, as every ``torch.nn.init`` function)."""
        base = where.rpartition(".")[2]
        always = (mutates_args or (base.endswith("_") and not base.endswith("__"))
                  or "batch_norm" in base or "instance_norm" in base)
        switches = self._mutating_switches(fn)
        check = self.check_tensors

        @functools.wraps(fn)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            if always:
                check(f"{where}()", itertools.chain(args, kwargs.values()))
            elif kwargs or switches:
                if kwargs.get("out") is not None:
                    check(f"{where}(out=...)", (kwargs["out"],))
                for name, index in switches:
                    value = kwargs[name] if name in kwargs else (args[index] if index < len(args) else None)
                    if value is not None and value is not False:
                        check(f"{where}({name}={value!r})", itertools.chain(args, kwargs.values()))
            result = fn(*args, **kwargs)
            if isinstance(result, types.ModuleType):
                raise deny(f"{where}() returned a module, which remote code cannot use")
            return result

        return guarded

    def _mutating_switches(self, fn: Callable) -> tuple[tuple[str, int], ...]:
        """Parameters of ``fn`` that, when set, make it write into its arguments,
        with their positional index (a large number for keyword-only ones)."""
        key = id(fn)
        if key not in self._signatures:
            try:
                params = list(inspect.signature(fn).parameters.values())
            except (TypeError, ValueError):  # builtins without a signature: out= only
                params = []
            self._signatures[key] = tuple(
                (p.name, i if p.kind is p.POSITIONAL_OR_KEYWORD else 1 << 30)
                for i, p in enumerate(params) if p.name in ("inplace", "max_norm")
            )
        return self._signatures[key]

    def view(self, name: str) -> ModuleView:
        view = self._views.get(name)
        if view is None:
            view = ModuleView(importlib.import_module(name), name, SPECS[name], self)
            self._views[name] = view
        return view

    def import_module(self, name: str, globals: Any = None, locals: Any = None,
                      fromlist: Any = (), level: int = 0) -> ModuleView:
        """The sandbox's ``__import__``."""
        if level != 0:
            raise deny("relative imports are not available in remote code")
        if name not in SPECS:
            raise deny(
                f"import of {name!r} is not allowed in remote code; available: "
                f"{', '.join(importable_modules())}"
            )
        try:
            self.view(name)
        except ImportError:
            raise deny(f"module {name!r} is not installed on this server") from None
        return self.view(name if fromlist else name.partition(".")[0])

    def emit(self, text: str) -> None:
        """Hand printed text to the job's print callback (stdout without one)."""
        if self.print_fn is None:
            print(text, end="")
        else:
            self.print_fn(text)

    def print_values(self, *values: Any) -> None:
        """``tracer.log(...)``: printed through the job's print callback."""
        self.emit(" ".join(str(v) for v in values) + "\n")


class _Writer:
    """What ``_write_`` hands back: performs one assignment after the policy allows it."""

    __slots__ = ("_obj", "_policy")

    def __init__(self, policy: Policy, obj: Any) -> None:
        object.__setattr__(self, "_policy", policy)
        object.__setattr__(self, "_obj", obj)

    def __setitem__(self, key: Any, value: Any) -> None:
        obj = object.__getattribute__(self, "_obj")
        object.__getattribute__(self, "_policy").check_setitem(obj, key)
        obj[key] = value

    def __delitem__(self, key: Any) -> None:
        obj = object.__getattribute__(self, "_obj")
        object.__getattribute__(self, "_policy").check_setitem(obj, key)
        del obj[key]

    def __setattr__(self, name: str, value: Any) -> None:
        obj = object.__getattribute__(self, "_obj")
        policy = object.__getattribute__(self, "_policy")
        policy.check_setattr(obj, name)
        if isinstance(obj, Envoy):
            policy.check_not_weight(f"model.{name} = ...", value)
        setattr(obj, name, value)

    def __delattr__(self, name: str) -> None:
        obj = object.__getattribute__(self, "_obj")
        object.__getattribute__(self, "_policy").check_setattr(obj, name, deleting=True)
        delattr(obj, name)


# ---------------------------------------------------------------- helpers

# Objects that lead to frames, code and globals; reaching one by any path is refused.
_UNREACHABLE_TYPES = (types.FrameType, types.CodeType, types.TracebackType)
_METHOD_TYPES = (types.BuiltinMethodType, types.MethodType, types.MethodWrapperType)
_UNREACHABLE_CLASSES = frozenset({type, object, super, types.FunctionType, types.CodeType})
_FORBIDDEN_BUILTINS = frozenset(
    id(getattr(builtins, name)) for name in (
        "open", "exec", "eval", "compile", "__import__", "getattr", "setattr", "delattr", "globals",
        "locals", "vars", "breakpoint", "input", "memoryview", "__build_class__",
    )
)


def _tensors_in(value: Any, depth: int = 0) -> Iterable[torch.Tensor]:
    """Tensors in ``value`` and in the lists, tuples and dicts it holds (a few levels deep)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif depth < 4 and isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors_in(item, depth + 1)
    elif depth < 4 and isinstance(value, dict):
        for item in value.values():
            yield from _tensors_in(item, depth + 1)


def _is_forbidden_builtin(value: Any) -> bool:
    """The real ``open``, ``eval``, ... reached as some object's attribute or item."""
    return id(value) in _FORBIDDEN_BUILTINS


def _span(tensor: torch.Tensor) -> tuple[int, int] | None:
    """The byte range of the memory behind ``tensor`` (its whole storage), or None if it has none."""
    storage = tensor.untyped_storage()
    start, size = storage.data_ptr(), storage.nbytes()
    if start == 0 or size == 0:
        return None
    return start, start + size


def _check_format(template: str) -> None:
    """``"{0.__class__}".format(x)`` walks attributes without passing ``_getattr_``:
    refuse field names with attribute or index access."""
    try:
        fields = list(string.Formatter().parse(template))
    except ValueError:
        return  # str.format will raise the same error itself
    for _, field, spec, _ in fields:
        if field is not None and ("." in field or "[" in field):
            raise deny(
                f"format field {{{field}}} reaches into an object, which is not allowed in remote "
                "code; use an f-string such as f\"{x.attr}\""
            )
        if spec:
            _check_format(spec)


def _glassbox_save(obj: Any) -> bool:
    from ...envoy import SavableTuple
    from ...tracing import tensor_save

    return getattr(type(obj), "save", None) in (tensor_save, SavableTuple.save)


def _is_tracer(obj: Any) -> bool:
    from ...tracing import Tracer

    return isinstance(obj, Tracer)


def _local_only(method: Callable, name: str) -> Callable:
    def call(*args: Any, **kwargs: Any) -> Any:
        for key in _LOCAL_ONLY_KWARGS:
            if kwargs.get(key):
                raise deny(
                    f"model.{name}({key}=...) cannot be used in remote code: it already runs on the server"
                )
        return method(*args, **kwargs)

    call.__name__ = name
    call.__doc__ = method.__doc__
    return call_through(call)  # `with model.generate(...)` must still read as a with block
