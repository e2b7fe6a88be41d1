"""The operations of ``.source``: modules the interleaver intercepts like any other, the dispatcher
the rewritten code calls, and the switch to the rewritten forward while an operation is touched.

Offers:
    Source        ``envoy.source``: ``print`` it for the listing; ``source.<op name>`` is that op's
                  envoy (an ordinary Envoy: ``.output``, ``.input(s)``, assignment, ``.skip()``,
                  ``.next()``, ``tracer.cache(modules=[op])``, and ``.source`` again for the
                  function the op calls)
    Operation     the torch module behind one op; never registered in the model (state_dict,
                  parameters and named_modules are unchanged), the parent of its envoy is the
                  module's (or the calling op's) envoy
    make_source   Envoy.source's factory (registered by the package's __init__)

How a touched op reaches the interleaver: the owner (the module, or the op whose callee is listed)
is "armed" when ``envoy.source`` is reached inside a trace, or when an op's Site is installed (its
envoy's "on_install" slot holds the arming, which its Site runs when a trace installs it; the owner's Site is
installed first, as an ancestor). Arming swaps the owner's ``site.original`` (what its installed wrapper runs)
for the rewritten forward, for this trace only: the interleaver resets ``site.original`` at every
install and its cleanup restores ``forward``. The rewritten code hands every call to the
dispatcher, which makes the call as written unless that op's Site is installed in a running trace,
and then calls the op's module with the callee kept aside (the user sees only the call's arguments
as inputs); an op touched while its call is under way (at a submodule it calls) gets its output
boundary when the call returns. A trace that reaches no ``.source`` runs none of this.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator
from typing import Any

import greenlet
import torch

from ..envoy import Envoy, children_of, display_of, module_of, root_of, slots_of
from ..errors import MissedModuleError, OutOfOrderError
from ..intercept import MISSING
from .listing import describe, listing
from .rewrite import Compiled, bind, rebuild, resolve, unwrap
from .rewrite import compiled as compiled_forward

_getcurrent = greenlet.getcurrent
_module_forward = torch.nn.Module.forward


class Operation(torch.nn.Module):
    """One call in a forward, as a module. It runs the callee the dispatcher handed over."""

    def __init__(self, source: Source, name: str) -> None:
        super().__init__()
        self._source = source
        self._op_name = name
        self._calls: list[tuple[Callable, Any]] = []  # (callee, greenlet) of the calls under way

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._callee()(*args, **kwargs)

    def _callee(self) -> Callable:
        calls = self._calls
        # only the code that made the call may run its callee: remote code at this op's boundary
        # must not get to call the raw function (a builtin getattr, say) with its own arguments
        if not calls or calls[-1][1] is not _getcurrent():
            raise TypeError(
                f"{self._op_name} is a call inside a forward: it runs when the forward makes it and cannot "
                "be called on its own (call the function yourself)"
            )
        return calls[-1][0]

    def _run(self, callee: Callable, *args: Any, **kwargs: Any) -> Any:
        calls = self._calls
        calls.append((callee, _getcurrent()))
        try:
            return self(*args, **kwargs)
        finally:
            calls.pop()

    def __repr__(self) -> str:
        return self._source._describe(self._op_name)


class Source:
    """The calls inside one forward (a module's, or the function one op calls).

        print(model.model.layers[0].self_attn.source)
        with model.trace("hello"):
            q = model.model.layers[0].self_attn.source.self_q_proj_0.output.save()
    """

    def __init__(self, envoy: Envoy) -> None:
        self._envoy = envoy  # a module's envoy, or the envoy of the op whose callee this lists
        self._ops: dict[str, Envoy] = {}
        self._hot: dict[str, tuple[Operation, dict]] = {}  # op name -> (module, envoy's slots), for dispatch
        self._seen: dict[str, Callable] = {}  # op name -> the function it called when last run
        self._runner: Any = None  # what _arm last put in the owner's site.original
        self._built: tuple[Any, Any] = (None, None)  # (callee, rebuilt): the last rewrite of a callee
        self._dispatch = _dispatcher(self._hot, self._seen)
        module = module_of(envoy)
        if not isinstance(module, Operation) and type(module).forward is _module_forward:
            shown = f"{display_of(envoy)} ({type(module).__name__})"
            raise TypeError(f"{shown} has no forward of its own to list")
        self._compiled()  # no source, or nothing known to call: say so now

    # ------------------------------------------------------------ what it lists

    def _title(self) -> str:
        return f"{display_of(self._envoy)}.source"

    def _function(self) -> types.FunctionType:
        """The innermost function whose calls this source lists."""
        module = module_of(self._envoy)
        if not isinstance(module, Operation):
            return unwrap(type(module).forward)[0]
        parent, name = module._source, module._op_name
        callee = parent._seen.get(name)
        if callee is None:
            compiled = parent._compiled()
            owner = module_of(parent._envoy)
            owner = None if isinstance(owner, Operation) else owner
            callee = resolve(compiled.callees.get(name), parent._function(), owner, compiled.assigned)
            if name in compiled.bindings:
                callee = bind  # an assignment: _as_function says so
        return unwrap(_as_function(callee, self._envoy, parent))[0]

    def _compiled(self) -> Compiled:
        return compiled_forward(self._function())

    # ------------------------------------------------------------ user side

    def __getattr__(self, name: str) -> Envoy:
        ops = self.__dict__.get("_ops")
        if ops is None or name.startswith("__"):
            raise AttributeError(name)
        op = ops.get(name)
        if op is not None:
            return op
        names = self._compiled().names
        if name not in names:
            raise AttributeError(
                f"{self._title()} has no operation {name!r}; its operations are: {', '.join(names) or 'none'}"
            )
        op = ops[name] = _op_envoy(self, name)
        self._hot[name] = (module_of(op), slots_of(op))
        return op

    def __iter__(self) -> Iterator[Envoy]:
        return iter([getattr(self, name) for name in self._compiled().names])

    def __dir__(self) -> list[str]:
        return list(self._compiled().names)

    def __repr__(self) -> str:
        return listing(self._compiled(), self._title())

    def _describe(self, name: str) -> str:
        compiled = self._compiled()
        where = f"{self._title()}.{name}"
        return describe(compiled, name, where) if name in compiled.lines else where

    # ------------------------------------------------------------ trace side

    def _arm(self, interleaver: Any) -> None:
        """Make the owner run the rewritten code in this trace (one of its ops is being installed, or
        this source was reached in the trace). The owner's Site is installed already."""
        site = interleaver.site(self._envoy)
        if self._runner is not None and site.original is self._runner:
            return  # armed earlier in this trace
        if site.n_in > site.n_out and interleaver.position != (site, "input", site.n_in):
            owner = display_of(self._envoy)
            raise OutOfOrderError(
                f"{self._title()} was reached while {owner} was already running (the trace is inside it): "
                "its operations exist only in a call that starts after .source is reached. Reach it before "
                f"the model enters {owner}, e.g. `source = {owner}.source` first in the block."
            )
        if isinstance(site.module, Operation):
            self._runner = self._function_runner(site.module)
        else:
            self._runner = self._module_runner(site)
        site.original = self._runner

    def _module_runner(self, site: Any) -> Callable:
        module = site.module
        forward = types.MethodType(rebuild(type(module).forward, self._dispatch), module)
        if site.saved_forward is MISSING:
            return forward
        # accelerate keeps the real forward in _old_forward and runs its hook around it
        hook, old = module.__dict__.get("_hf_hook"), module.__dict__.get("_old_forward")
        if hook is not None and getattr(old, "__func__", None) is type(module).forward:
            return _with_hook(module, hook, forward)
        raise TypeError(
            f"{display_of(self._envoy)}.forward is set on the instance ({site.saved_forward!r}): .source "
            f"rewrites {type(module).__name__}.forward and would bypass it"
        )

    def _function_runner(self, op: Operation) -> Callable:
        def run(*args: Any, **kwargs: Any) -> Any:
            return self._rewritten(op._callee())(*args, **kwargs)

        return run

    def _rewritten(self, callee: Any) -> Callable:
        """``callee`` (what the op calls this time) running its rewritten code."""
        target, bound = callee, None
        if type(callee) is types.MethodType:
            target, bound = callee.__func__, callee.__self__
        known, built = self._built
        if target is not known:
            parent = module_of(self._envoy)._source
            inner = unwrap(_as_function(target, self._envoy, parent))[0]
            names = compiled_forward(inner).names
            missing = [name for name, (_, slots) in self._hot.items()
                       if name not in names and _in_trace(slots)]
            if missing:
                raise MissedModuleError(
                    f"{display_of(self._envoy)} called {inner.__qualname__}, which has no operation "
                    f"{', '.join(missing)} (that was listed for another function, before this op ran); its "
                    f"operations are: {', '.join(names) or 'none'}"
                )
            built = rebuild(target, self._dispatch)
            self._built = (target, built)
        return built if bound is None else types.MethodType(built, bound)


def make_source(envoy: Envoy) -> Source:
    """``envoy.source``: the calls inside the module's forward, or, on an op, inside its callee (one
    Source per envoy). Inside a trace, reaching it switches the owner to the rewritten forward for
    this trace, so that ops reached later (after a submodule's value) still catch the current call."""
    slots = slots_of(envoy)
    source = slots.get("source")
    if source is None:
        source = slots["source"] = Source(envoy)
    interleaver = getattr(root_of(envoy), "active", None)
    if interleaver is not None:
        interleaver.site(envoy)  # installs the owner (and, for an op, arms the op's own owner)
        source._arm(interleaver)
    return source


def _op_envoy(source: Source, name: str) -> Envoy:
    envoy = Envoy(Operation(source, name), source._envoy, name, at=f"source.{name}")
    slots_of(envoy)["on_install"] = source._arm  # run by its Site when a trace installs it (module docstring)
    return envoy


def _dispatcher(ops: dict[str, tuple[Operation, dict]], seen: dict[str, Callable]) -> Callable:
    """``__gb_op__(name, callee, *args, **kwargs)``: the call itself, or, while that op is touched in a
    running trace, a call of its Operation with the callee kept aside."""

    def dispatch(name: str, callee: Any, /, *args: Any, **kwargs: Any) -> Any:
        kind = type(callee)
        if kind is types.FunctionType:  # remembered for op.source (functions only: no tensors kept)
            if callee is not bind:  # an assignment op calls nothing
                seen[name] = callee
        elif kind is types.MethodType:
            seen[name] = callee.__func__
        op = ops.get(name)  # (module, slots): no envoy read per call
        if op is not None and _in_trace(op[1]):
            return op[0]._run(callee, *args, **kwargs)
        result = callee(*args, **kwargs)
        op = ops.get(name)
        if op is not None and _in_trace(op[1]):  # touched during the call, at a module inside it
            return _late_output(op[1]["site"], result)
        return result

    return dispatch


def _late_output(site: Any, value: Any) -> Any:
    """The output boundary of an op touched while its call was under way (at a submodule it calls,
    as ``layer.mlp.input`` inside ``self_mlp_0``): its input was passed before anyone asked, so only
    the output is served, as the installed wrapper would serve it."""
    interleaver = site.interleaver
    if _getcurrent() is not interleaver.runner_glet:
        return value  # an ad hoc call from user code
    site.n_in += 1
    site.n_out += 1
    if site.waiting_out or site.recorders:
        return interleaver.boundary(site, "output", value, site.n_out)
    interleaver.position = (site, "output", site.n_out)
    return value


def _as_function(callee: Any, op: Envoy, parent: Source) -> types.FunctionType:
    """The Python function ``op`` calls, or a TypeError that says why there is none."""
    if isinstance(callee, types.MethodType):
        callee = callee.__func__
    if callee is bind:
        raise TypeError(f"{display_of(op)} is an assignment: it binds a value and calls nothing, so it "
                        "has no source to list")
    if isinstance(callee, torch.nn.Module):
        child = next((e for e in children_of(parent._envoy).values() if module_of(e) is callee), None)
        where = f"{display_of(child)}.source" if child is not None else "that module's own .source"
        raise TypeError(f"{display_of(op)} calls a submodule: its calls are listed by {where}")
    if callee is None:
        raise TypeError(
            f"cannot tell which Python function {display_of(op)} calls: its callee is not a name that can be "
            "looked up without running the forward, and no traced run has called a Python function there "
            "(read its .output in a trace once; tensor methods and builtins have no source to list)"
        )
    if not isinstance(callee, types.FunctionType):
        raise TypeError(f"{display_of(op)} calls {callee!r}, which has no Python source to list")
    return callee


def _in_trace(slots: dict) -> bool:
    """Whether the op whose envoy has these slots is installed in a running trace."""
    site = slots.get("site")
    return site is not None and site.interleaver is not None


def _with_hook(module: torch.nn.Module, hook: Any, forward: Callable) -> Callable:
    """What accelerate's wrapper does around ``_old_forward``, around the rewritten forward."""

    def run(*args: Any, **kwargs: Any) -> Any:
        args, kwargs = hook.pre_forward(module, *args, **kwargs)
        if hook.no_grad:
            with torch.no_grad():
                output = forward(*args, **kwargs)
        else:
            output = forward(*args, **kwargs)
        return hook.post_forward(module, output)

    return run
