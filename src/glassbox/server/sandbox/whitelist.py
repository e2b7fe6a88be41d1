"""The modules remote code may import, and the read-only view it gets of each.

Offers:
    SPECS                 module name -> what it exposes (an allow list, or a deny list)
    ModuleView            read-only view of a whitelisted module
    importable_modules()  the whitelisted names installed here
    dangerous(name)       does an attribute name suggest files, processes, hooks, serialisation?

A view raises (through its policy) SandboxError, never AttributeError:
CPython's ``from m import x`` falls back to ``sys.modules`` on AttributeError,
which would hand out the real, unguarded submodule.
"""

from __future__ import annotations

import importlib
import types
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .guards import Policy

# Substrings of attribute names that touch files, processes, the network, hooks
# that outlive the job, or serialisation (which is how pickle gets in).
_DANGEROUS_WORDS = (
    "save", "load", "dump", "pickle", "file", "hub", "pretrained", "register", "hook", "socket",
    "thread", "process", "popen", "spawn", "system", "write", "open", "export", "import", "serializ",
    "share_memory", "storage", "compile", "exec", "remote", "upload", "push_to", "ctypes",
)


def dangerous(name: str) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in _DANGEROUS_WORDS)


class _Spec:
    """What a whitelisted module exposes.

    allow:         the only names offered (None: every public name not refused below)
    deny / deny_prefixes:  names refused
    classes:       the only classes offered (None: any); torch re-exports dozens of
                   TorchScript internals (CompilationUnit compiles code from a string)
    submodules:    attribute -> module name, each itself whitelisted
    guard_calls:   wrap functions so they refuse to write into protected tensors
    mutates_args:  every function writes into its tensor arguments (torch.nn.init)
    """

    def __init__(self, allow: Iterable[str] | None = None, deny: Iterable[str] = (),
                 deny_prefixes: tuple[str, ...] = (), classes: Iterable[str] | None = None,
                 submodules: dict[str, str] | None = None, guard_calls: bool = False,
                 mutates_args: bool = False) -> None:
        self.allow = None if allow is None else frozenset(allow)
        self.deny = frozenset(deny)
        self.deny_prefixes = deny_prefixes
        self.classes = None if classes is None else frozenset(classes)
        self.submodules = submodules or {}
        self.guard_calls = guard_calls
        self.mutates_args = mutates_args


_TORCH_DENY = {
    # files, serialisation, code loading, compilers, TorchScript, other threads
    "load", "save", "hub", "from_file", "frombuffer", "asarray", "compile", "jit", "ops", "classes",
    "library", "get_device_module", "export", "fx", "onnx", "package", "profiler", "serialization",
    "fork", "wait", "cond", "while_loop", "parse_ir", "parse_schema", "parse_type_comment",
    "merge_type_from_type_comment", "unify_type_list", "classproperty", "to_dlpack",
    # process-wide state that would leak into the next job (grad mode: use torch.no_grad())
    "set_grad_enabled", "manual_seed_all", "default_generator", "autocast_increment_nesting",
    "autocast_decrement_nesting", "clear_autocast_cache",
}
_TORCH_CLASSES = {
    "Tensor", "Size", "dtype", "device", "layout", "memory_format", "Generator", "finfo", "iinfo",
    "no_grad", "enable_grad", "inference_mode", "autocast", "SymInt", "SymFloat", "SymBool",
    "OutOfMemoryError", "BoolTensor", "ByteTensor", "CharTensor", "ShortTensor", "IntTensor",
    "LongTensor", "HalfTensor", "BFloat16Tensor", "FloatTensor", "DoubleTensor",
}
SPECS: dict[str, _Spec] = {
    "torch": _Spec(deny=_TORCH_DENY, deny_prefixes=("set_", "use_"), classes=_TORCH_CLASSES,
                   guard_calls=True, submodules={
                       "nn": "torch.nn", "linalg": "torch.linalg", "fft": "torch.fft",
                       "special": "torch.special", "autograd": "torch.autograd", "func": "torch.func",
                       "distributions": "torch.distributions", "cuda": "torch.cuda",
                   }),
    "torch.nn": _Spec(deny={"utils", "parallel", "modules", "parameter", "attention", "backends"},
                      guard_calls=True,
                      submodules={"functional": "torch.nn.functional", "init": "torch.nn.init"}),
    "torch.nn.functional": _Spec(guard_calls=True),
    "torch.nn.init": _Spec(guard_calls=True, mutates_args=True),
    "torch.linalg": _Spec(guard_calls=True),
    "torch.fft": _Spec(guard_calls=True),
    "torch.special": _Spec(guard_calls=True),
    "torch.autograd": _Spec(allow={"grad", "backward"}, guard_calls=True,
                            submodules={"functional": "torch.autograd.functional"}),
    "torch.autograd.functional": _Spec(allow={"jacobian", "hessian", "vjp", "jvp", "hvp", "vhp"},
                                       guard_calls=True),
    # No functional_call: it swaps the served module's parameters while it runs,
    # which a concurrent job sharing the model would see.
    "torch.func": _Spec(allow={"vmap", "grad", "grad_and_value", "jacrev", "jacfwd", "hessian", "vjp",
                               "jvp"}, guard_calls=True),
    "torch.distributions": _Spec(guard_calls=True),
    "torch.cuda": _Spec(allow={"is_available", "device_count", "current_device", "get_device_name",
                               "is_bf16_supported"}),
    "math": _Spec(),
    "itertools": _Spec(),
    "functools": _Spec(allow={"partial", "reduce", "cmp_to_key"}),
    "collections": _Spec(allow={"defaultdict", "Counter", "OrderedDict", "deque", "namedtuple"}),
    "einops": _Spec(allow={"rearrange", "reduce", "repeat", "einsum", "pack", "unpack", "parse_shape"}),
    "glassbox": _Spec(allow={"save"}),
}


# Fresh allocations are zero-filled: freed memory may still hold values of the other requests
# of the same forward pass (across jobs, each job's memory dies with its process).
_ZERO_FILLED = frozenset({"empty", "empty_like", "empty_strided"})


def _zero_filled(allocate: Any) -> Any:
    def allocate_zeroed(*args: Any, **kwargs: Any) -> Any:
        tensor = allocate(*args, **kwargs)
        with torch.no_grad():
            return tensor.zero_() if isinstance(tensor, torch.Tensor) else tensor

    return allocate_zeroed


def importable_modules() -> list[str]:
    """The module names remote code may import (those installed here)."""
    out = []
    for name in SPECS:
        try:
            importlib.import_module(name)
        except ImportError:
            continue
        out.append(name)
    return out


class ModuleView:
    """Read-only view of a whitelisted module: names outside the whitelist, private
    names and submodules not listed raise SandboxError; torch functions come
    back wrapped so they refuse to write into protected tensors."""

    __slots__ = ("_cache", "_module", "_name", "_policy", "_spec")

    def __init__(self, module: types.ModuleType, name: str, spec: _Spec, policy: Policy) -> None:
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_spec", spec)
        object.__setattr__(self, "_policy", policy)
        object.__setattr__(self, "_cache", {})

    def __getattr__(self, attr: str) -> Any:
        cache = object.__getattribute__(self, "_cache")
        if attr in cache:
            return cache[attr]
        name = object.__getattribute__(self, "_name")
        spec: _Spec = object.__getattribute__(self, "_spec")
        policy: Policy = object.__getattribute__(self, "_policy")
        where = f"{name}.{attr}"
        if attr.startswith("_"):
            raise policy.refuse(f"{where} is private and cannot be used in remote code")
        if attr in spec.submodules:
            value = policy.view(spec.submodules[attr])
            cache[attr] = value
            return value
        if spec.allow is not None and attr not in spec.allow:
            offers = ", ".join(sorted(spec.allow))
            raise policy.refuse(f"{where} is not available in remote code; {name} offers: {offers}")
        refused = attr in spec.deny or attr.startswith(spec.deny_prefixes) or attr.endswith("Storage")
        # A name listed explicitly (glassbox.save) was reviewed; the word rule is for the rest.
        if refused or (spec.allow is None and dangerous(attr)):
            raise policy.refuse(
                f"{where} is not available in remote code (files, processes, compilation and "
                "process-wide settings are off limits; e.g. use `with torch.no_grad():` for grad mode)"
            )
        module = object.__getattribute__(self, "_module")
        try:
            value = getattr(module, attr)
        except AttributeError:
            raise policy.refuse(f"module {name!r} has no attribute {attr!r}") from None
        if isinstance(value, types.ModuleType):
            raise policy.refuse(f"{where} is a module that remote code cannot use")
        if isinstance(value, type):
            if spec.classes is not None and attr not in spec.classes:
                raise policy.refuse(f"{where} is not available in remote code")
            if issubclass(value, torch.nn.Module) and _takes_inplace(value):
                value = _without_inplace(value, where, policy)
        elif spec.guard_calls and callable(value):
            if name == "torch" and attr in _ZERO_FILLED:
                value = _zero_filled(value)
            value = policy.guard_call(value, where, spec.mutates_args)
        cache[attr] = value
        return value

    def __setattr__(self, attr: str, value: Any) -> None:
        self._refuse_write("assign", attr)

    def __delattr__(self, attr: str) -> None:
        self._refuse_write("delete", attr)

    def _refuse_write(self, verb: str, attr: str) -> None:
        # Monkeypatching a shared module would change every later job.
        name = object.__getattribute__(self, "_name")
        raise object.__getattribute__(self, "_policy").refuse(
            f"cannot {verb} {name}.{attr}: modules are read-only in remote code"
        )

    def __repr__(self) -> str:
        return f"<module {object.__getattribute__(self, '_name')!r} (sandbox view)>"

    def __dir__(self) -> list[str]:
        spec: _Spec = object.__getattribute__(self, "_spec")
        names = spec.allow if spec.allow is not None else dir(object.__getattribute__(self, "_module"))
        return sorted(n for n in names if not n.startswith("_")) + sorted(spec.submodules)


def _takes_inplace(cls: type) -> bool:
    import inspect

    try:
        return "inplace" in inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return False


def _without_inplace(cls: type, where: str, policy: Policy) -> Any:
    """``cls`` as a constructor that refuses in-place modules: ``nn.ReLU(inplace=True)(w)``
    writes into ``w`` from C, where no guard sees it, and ``w`` may be a weight."""

    def construct(*args: Any, **kwargs: Any) -> Any:
        module = cls(*args, **kwargs)
        if any(getattr(m, "inplace", False) is True for m in module.modules()):
            raise policy.refuse(
                f"{where}(..., inplace=True) is not available in remote code: an in-place module "
                "can write into the model's weights; use inplace=False"
            )
        return module

    construct.__name__ = cls.__name__
    construct.__doc__ = cls.__doc__
    return construct
