"""What the interleaver keeps per touched module, and the wrapper it installs.

Offers:
    Site            interception state of one module (kept on its envoy
                    between traces; counters reset per trace)
    make_wrapper    the ``forward`` put on a touched module: ad hoc calls from
                    user code pass straight through; calls by the model meet
                    waiting consumers at the input and output boundaries
    Consumer        user code waiting for values: the trace body itself or
                    one deferred invoke body
    MISSING         "no value" marker (None is a legitimate module output)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import greenlet
import torch

from .batching import Rows
from .envoy import display_of, module_of, parent_of, slots_of

if TYPE_CHECKING:
    from .interleave import Interleaver

MISSING = object()
_getcurrent = greenlet.getcurrent


class Site:
    """Interception state of one module. Kept on its envoy between traces (with
    its ``forward`` wrapper, built once); counters are reset for every trace."""

    __slots__ = (
        "bound",
        "container",
        "envoy",
        "interleaver",
        "module",
        "n_in",
        "n_out",
        "namespace",
        "on_install",
        "original",
        "parent",
        "recorders",
        "saved_forward",
        "skip_value",
        "waiting_in",
        "waiting_out",
        "wrapper",
    )

    def __init__(self, envoy: Any) -> None:
        self.envoy = envoy
        self.module = module_of(envoy)  # an envoy's module changes only by rebind, which drops its Site
        self.parent = parent_of(envoy)  # installed first (interleave.py)
        # where the wrapper goes, read once: ``module.__dict__`` is a slow lookup on a Module (its
        # class has __getattr__) and installing and restoring it is per access
        self.namespace: dict[str, Any] = self.module.__dict__
        self.interleaver: Interleaver | None = None
        self.original: Any = None
        self.saved_forward: Any = MISSING
        # Containers (ModuleList, ModuleDict) are never called: nothing to install. ``bound`` keeps
        # the class forward bound to the module across traces (installing is per access).
        self.container = type(self.module).forward is torch.nn.Module.forward
        self.bound: Any = None
        # run when a trace installs this Site, before the module's wrapper: a `.source` op arms its
        # owner (source/ops.py puts it in the op envoy's "on_install" slot)
        self.on_install: Callable[[Any], None] | None = slots_of(envoy).get("on_install")
        self.recorders: list[Callable[[str, Any], None]] = []
        self.wrapper = make_wrapper(self)
        self.reset()

    def reset(self) -> None:
        self.n_in = 0
        self.n_out = 0
        self.waiting_in = 0
        self.waiting_out = 0
        self.skip_value: Any = MISSING
        if self.recorders:
            self.recorders = []

    def count(self, kind: str) -> int:
        return self.n_in if kind == "input" else self.n_out

    def describe(self, kind: str, call: int | None = None) -> str:
        text = f"{display_of(self.envoy)}.{kind}"
        return text if call is None else f"{text} (call {call})"


class Consumer:
    """User code that waits for values: the trace body or one invoke body."""

    __slots__ = (
        "absent",
        "after_iter",
        "at",
        "at_kind",
        "current",
        "done",
        "first",
        "glet",
        "iteration",
        "name",
        "on_yield",
        "replaced",
        "requested_at",
        "rows",
        "run",
        "soft",
        "started",
        "waiting",
        "waiting_kind",
        "wake",
        "want",
    )

    def __init__(self, name: str, rows: Rows | None, run: Callable[[], Any] | None = None):
        self.name = name
        self.rows = rows
        self.run = run  # None: the driver greenlet itself (inline body)
        self.glet: greenlet.greenlet | None = None
        self.waiting: Site | None = None
        self.waiting_kind = ""
        self.at: Site | None = None
        self.at_kind = ""
        self.current: Any = None
        self.replaced = False
        self.requested_at: tuple[Site, str, int] | None = None
        self.done = False
        self.started = False
        self.on_yield: Callable[[], None] | None = None  # runs each time it hands back control
        self.wake: Callable[[], None] | None = None  # runs once the forward has ended
        self.soft = False  # the current wait ends quietly (ENDED) if the model finishes
        # An engine that runs several requests in steps (glassbox.vllm) sets this for a step that
        # holds none of this consumer's rows: it is not served there and waits for a later step.
        self.absent = False
        # Per-call iteration (``tracer.iter`` in a plain trace): while set, an access means the
        # module's call ``iteration + 1``; ``want`` is the call being waited for (0: the next one)
        # and ``first`` the first (site, kind) asked for in the iteration (iteration.py's anchor).
        self.iteration: int | None = None
        self.want = 0
        self.first: tuple[Site, str] | None = None
        # After a ``tracer.iter`` loop a plain read means the module's first call again, as in
        # nnsight (whose reads bind to iteration 0): one whose first call has passed is out of order.
        self.after_iter = False


def make_wrapper(site: Site) -> Callable[..., Any]:
    """The ``forward`` installed on a touched module: passes straight through
    for calls from user code (ad hoc calls), meets consumers at both
    boundaries when the model itself calls it."""

    def forward(*args: Any, **kwargs: Any) -> Any:
        interleaver = site.interleaver
        if interleaver is None or _getcurrent() is not interleaver.runner_glet:
            return site.original(*args, **kwargs)
        site.n_in += 1
        if site.waiting_in or site.recorders:
            args, kwargs = interleaver.boundary(site, "input", (args, kwargs), site.n_in)
        if site.skip_value is not MISSING:
            output, site.skip_value = site.skip_value, MISSING
        else:
            output = site.original(*args, **kwargs)
        site.n_out += 1
        if site.waiting_out or site.recorders:
            return interleaver.boundary(site, "output", output, site.n_out)
        interleaver.position = (site, "output", site.n_out)
        return output

    return forward
