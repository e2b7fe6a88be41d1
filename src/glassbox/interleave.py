"""Run the model in a greenlet and meet the user's code at module boundaries.

Offers:
    Interleaver   one forward (or generate) of one trace: installs thin
                  ``forward`` wrappers on the modules the body touches (and
                  their ancestors), serves values to waiting consumers, and
                  removes every wrapper afterwards.
    ENDED         what a soft request returns when the model finished first
    (Consumer and Site live in intercept.py, the pooled runner in runner.py, the
    wording of a request the model could not serve in misses.py.)

Call hierarchy::

    trace body (driver greenlet)            runner greenlet (pooled per thread)
    ─────────────────────────────           ────────────────────────────────────
    envoy.output ─► request() ── switch ──► task(): model(*inputs)
                                              wrapped module.forward
                                                └─► boundary(site, "output", out)
                      value ◄── switch ────────────┘  (serve each waiting consumer)
    tracer.__exit__ ─► finish() ─ switch ──► ... forward returns ─► TASK_ENDED
    any error      ─► cleanup(): abort runner, kill invoke greenlets, unwrap

Why wrappers and not hooks: torch binds ``self.forward`` and decides on its
hook-free fast path when a call starts, so interception must be in place
before a module starts; installing on a module together with its ancestors
guarantees that for every module that is still ahead of the model. Modules
nobody touched keep torch's fast path and cost nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import greenlet
import torch

from .batching import copy_back, narrow, own_copy, splice
from .envoy import display_of, module_of, slots_of
from .errors import OutOfOrderError, TraceStateError
from .intercept import MISSING, Consumer, Site
from .misses import finished_error, missed_error
from .runner import TASK_ENDED, Abort, acquire_runner, release_runner

ENDED = TASK_ENDED  # what a soft request returns when the model finished first
_getcurrent = greenlet.getcurrent
_is_grad_enabled = torch.is_grad_enabled
_set_grad_enabled = torch._C._set_grad_enabled


# ---------------------------------------------------------------- interleaver


class _HookedCall:
    """What a consumer hands the runner for ``envoy(x, hook=True)``."""

    __slots__ = ("args", "kwargs", "module")

    def __init__(self, module: Any, args: tuple, kwargs: dict) -> None:
        self.module, self.args, self.kwargs = module, args, kwargs


class Interleaver:
    """Drive one model execution and serve module boundaries to consumers."""

    def __init__(self, root: Any, batch_size: int, narrow_min_ndim: int = 1) -> None:
        self.root = root
        self.batch_size = batch_size
        self.narrow_min_ndim = narrow_min_ndim
        self.driver = _getcurrent()
        self.runner = acquire_runner()
        self.runner_glet = self.runner.glet
        # by id(module), in install order (cleanup restores them in reverse): one Site per module
        self.sites: dict[int, Site] = {}
        self.envoy_sites: dict[Any, Site] = {}  # by envoy: what request() finds it by, no envoy field read
        self.consumers: list[Consumer] = []
        self.by_glet: dict[Any, Consumer] = {}
        self.task: Callable[[], Any] | None = None
        self.state = "new"  # new -> running -> done | error | stopped | aborted
        self.result: Any = None
        self.error: BaseException | None = None
        self.consumer_error: BaseException | None = None
        self.position: tuple[Site, str, int] | None = None
        self.model_grad = _is_grad_enabled()
        self.stop_requested = False

    # ------------------------------------------------------------ setup

    def add_consumer(self, consumer: Consumer) -> None:
        self.consumers.append(consumer)
        if consumer.run is None:
            consumer.glet = self.driver
            consumer.started = True
            self.by_glet[self.driver] = consumer

    def current_consumer(self) -> Consumer:
        consumer = self.by_glet.get(_getcurrent())
        if consumer is None:
            if any(c.run is not None for c in self.consumers):
                raise TraceStateError(
                    "this trace batches tracer.invoke(...) blocks: access modules "
                    "inside an invoke block, not between them"
                )
            raise TraceStateError(
                "module values can only be accessed from the trace body that "
                "opened the trace (not from another thread or a callback)"
            )
        return consumer

    def site(self, envoy: Any) -> Site:
        """``envoy``'s Site in this trace, installed (with its ancestors) on first use."""
        return self.envoy_sites.get(envoy) or self._add_site(envoy)

    def _add_site(self, envoy: Any) -> Site:
        # per module per trace: kept to plain attribute work (no Site.reset or install calls).
        # The Site is kept in the envoy's "site" slot between traces (envoy.rebind empties it),
        # with the envoy's module and parent, so a reused one costs one seam call.
        slots = slots_of(envoy)
        site = slots.get("site")
        known = self.sites.get(id(module_of(envoy) if site is None else site.module))
        if known is not None:  # another envoy of a module this trace has (an edited copy's)
            self.envoy_sites[envoy] = known
            return known
        if site is None or site.interleaver is not None:
            site = slots["site"] = Site(envoy)
        else:  # Site.reset, inlined; cleanup already emptied its recorders
            site.n_in = site.n_out = site.waiting_in = site.waiting_out = 0
            site.skip_value = MISSING
        parent = site.parent
        if parent is not None and parent not in self.envoy_sites:
            self._add_site(parent)  # ancestors first (see the module docstring)
        module = site.module
        if site.on_install is not None:  # an op of `.source`: its owner runs the rewritten forward
            site.on_install(self)
        self.envoy_sites[envoy] = site
        site.interleaver = self
        if site.container:
            self.sites[id(module)] = site
            return site
        namespace = site.namespace
        saved = site.saved_forward = namespace.get("forward", MISSING)
        bound = site.bound
        if saved is MISSING and bound is not None and bound.__func__ is type(module).forward:
            site.original = bound  # the common case: as last trace, wrapper.__wrapped__ included
        else:
            site.original = module.forward
            site.bound = site.original if saved is MISSING else None
            site.wrapper.__wrapped__ = site.original  # keeps inspect.signature(module.forward)
        namespace["forward"] = site.wrapper
        self.sites[id(module)] = site  # only now: cleanup restores what a Site there saved
        return site

    # ------------------------------------------------------------ runner side

    def boundary(self, site: Site, kind: str, value: Any, call: int) -> Any:
        """Runner side: the model is at ``site``'s ``kind`` boundary (its call ``call``) with
        ``value``; serve each consumer waiting there, in order, and return the value the model
        goes on with (replaced, or edited in place, by them). Serving is inlined here, not a
        method: this is the per-access path, and every step below is paid by each read."""
        self.position = (site, kind, call)
        if site.waiting_out if kind == "output" else site.waiting_in:
            for consumer in self.consumers:
                if (consumer.waiting is not site or consumer.waiting_kind != kind or consumer.absent
                        or (consumer.want and consumer.want != call)):
                    continue
                consumer.waiting = None  # _clear_wait, inlined
                if kind == "output":
                    site.waiting_out -= 1
                else:
                    site.waiting_in -= 1
                rows = consumer.rows
                if rows is None:  # the whole batch (a trace with one input): the value itself
                    view = given = value
                else:
                    view = narrow(value, rows, self.batch_size, self.narrow_min_ndim)
                    given = own_copy(view) if rows.own else view
                consumer.at, consumer.at_kind = site, kind
                consumer.current, consumer.replaced = given, False
                if consumer.run is None:  # the inline body: it never ends or raises into the runner
                    handed = consumer.glet.switch(given)  # type: ignore[union-attr]
                    # a bare switch() hands over (), not None: test the type, not for None
                    if type(handed) is _HookedCall:  # envoy(x, hook=True): run it here, watched
                        self._run_hooked(consumer, handed)
                    if _is_grad_enabled() != self.model_grad:
                        _set_grad_enabled(self.model_grad)
                else:
                    self.resume(consumer, given)
                consumer.at = None
                if consumer.replaced:
                    new = consumer.current
                    if rows is not None:
                        new = splice(value, rows, new, self.batch_size, self.narrow_min_ndim, rows.own)
                    value = new
                elif given is not view:
                    copy_back(view, given, value)  # its edits reach its rows; its copy stays its own
                consumer.current = None
                if self.stop_requested:
                    raise Abort()
        if site.recorders:
            for record in site.recorders:  # after edits: the cache holds what the model used
                record(kind, value)
        return value

    def resume(self, consumer: Consumer, payload: Any) -> None:
        try:
            handed = consumer.glet.switch(payload)  # type: ignore[union-attr]
            if type(handed) is _HookedCall and not consumer.glet.dead:  # type: ignore[union-attr]
                self._run_hooked(consumer, handed)
        except Abort:
            raise
        except BaseException as exc:  # an invoke body raised: fail the trace
            consumer.done = True
            if self.consumer_error is None:
                self.consumer_error = exc
            raise Abort() from None
        if consumer.glet.dead:  # type: ignore[union-attr]
            consumer.done = True
        if consumer.on_yield is not None:
            consumer.on_yield()
        if _is_grad_enabled() != self.model_grad:
            _set_grad_enabled(self.model_grad)

    def hooked_call(self, module: Any, args: tuple, kwargs: dict) -> Any:
        """Consumer side of ``envoy(x, hook=True)``: run ``module`` on the runner greenlet, where
        its modules' boundaries are served like the model's own calls (other bodies waiting on
        its submodules see this call), and return its output. Only while this consumer is being
        served a value: the model is paused there, so the call happens at that point of it."""
        consumer = self.current_consumer()
        if consumer.at is None or self.state != "running":
            raise TraceStateError(
                "module(..., hook=True) runs the call inside the model's forward, so it can only be "
                "made while the trace holds a value of the model: read a module's .output or .input "
                "first, then call it (or call it without hook=True)"
            )
        return self.runner_glet.switch(_HookedCall(module, args, kwargs))

    def _run_hooked(self, consumer: Consumer, handed: Any) -> None:
        """Runner side: run each call the consumer hands over and give it the result (its
        error, if the call raised), until it hands back control for anything else."""
        while type(handed) is _HookedCall:
            try:
                result = handed.module(*handed.args, **handed.kwargs)
            except Abort:
                raise
            except Exception as exc:  # the caller sees the call's own error, where it made it
                handed = consumer.glet.throw(exc)  # type: ignore[union-attr]
            else:
                handed = consumer.glet.switch(result)  # type: ignore[union-attr]

    def _start_consumers(self) -> None:
        for consumer in self.consumers:
            if not consumer.started:
                consumer.started = True
                consumer.glet = greenlet.greenlet(consumer.run)
                self.by_glet[consumer.glet] = consumer
                self.resume(consumer, None)
                if self.stop_requested:
                    raise Abort()

    def spawn(self, consumer: Consumer) -> None:
        """Runner side: start a consumer now (e.g. a ``tracer.all()`` body at
        the start of a generation step); it runs until its first request."""
        self.consumers.append(consumer)
        consumer.started = True
        consumer.glet = greenlet.greenlet(consumer.run)
        self.by_glet[consumer.glet] = consumer
        self.resume(consumer, None)

    def run_task(self, model_call: Callable[[], Any]) -> Any:
        """Runner-side task: start deferred invoke bodies, run the model, then
        tell consumers still waiting that their module never came."""
        self._start_consumers()
        result = model_call()
        for consumer in self.consumers:
            if consumer.wake is not None and not consumer.done:
                consumer.wake()
        for consumer in self.consumers:
            while consumer.run is not None and not consumer.done and consumer.waiting is not None:
                if consumer.soft:
                    self._clear_wait(consumer)
                    self.resume(consumer, TASK_ENDED)
                    continue
                error = self._missed_error(consumer)
                self._clear_wait(consumer)
                try:
                    consumer.glet.throw(error)  # type: ignore[union-attr]
                except BaseException as exc:
                    consumer.done = True
                    if self.consumer_error is None:
                        self.consumer_error = exc
                    break
                if consumer.glet.dead:  # type: ignore[union-attr]
                    consumer.done = True
        return result

    # ------------------------------------------------------------ consumer side

    def request(self, envoy: Any, kind: str, fresh: bool = False, soft: bool = False) -> Any:
        """Block the calling consumer until the model reaches ``envoy``'s
        ``kind`` boundary; return the value there (this invoke's rows).
        With ``soft``, return ENDED instead of raising if the model finishes."""
        consumer = self.by_glet.get(_getcurrent()) or self.current_consumer()
        site = self.envoy_sites.get(envoy) or self._add_site(envoy)
        state = self.state
        if not fresh:
            if consumer.iteration is not None:
                return self._request_call(consumer, site, envoy, kind, consumer.iteration + 1, soft)
            if consumer.at is site and consumer.at_kind == kind:
                return consumer.current
            if consumer.after_iter and site.count(kind) and state in ("running", "new"):
                raise OutOfOrderError(
                    f"{site.describe(kind)} was read after a tracer.iter loop, where a plain read "
                    f"means the module's first call again (as in nnsight), and the model has already "
                    f"made it (it is at call {site.count(kind)}): read it inside the loop, or in "
                    "tracer.iter[n]"
                )
        if state != "running" and state != "new":
            if soft:
                return TASK_ENDED
            self._check_can_wait(site, kind)
        consumer.soft = soft
        consumer.waiting, consumer.waiting_kind = site, kind
        if kind == "input":
            site.waiting_in += 1
        else:
            site.waiting_out += 1
        consumer.requested_at = self.position
        consumer.at = None
        if consumer.run is not None or state != "running":
            return TASK_ENDED if self._wait(consumer) is TASK_ENDED else consumer.current
        # _wait for the trace body while the model runs, inlined: this is the per-access path
        user_grad = _is_grad_enabled()
        if user_grad != self.model_grad:
            _set_grad_enabled(self.model_grad)
        self.runner.driver = self.driver
        message = self.runner_glet.switch()
        if message is TASK_ENDED:
            self._collect()
        model_grad = self.model_grad = _is_grad_enabled()
        if user_grad != model_grad:
            _set_grad_enabled(user_grad)
        if message is TASK_ENDED:
            if soft and self.state != "error":
                self._clear_wait(consumer)
                return TASK_ENDED
            self._raise_for_driver_wait(consumer)
        return consumer.current

    def request_call(self, envoy: Any, kind: str, call: int, soft: bool = False) -> Any:
        """Like ``request``, for the module's call number ``call`` (1 is the first) of this
        forward: the per-call iteration of ``tracer.iter`` in a plain trace."""
        return self._request_call(self.current_consumer(), self.site(envoy), envoy, kind, call, soft)

    def _request_call(self, consumer: Consumer, site: Site, envoy: Any, kind: str, call: int,
                      soft: bool) -> Any:
        if consumer.first is None:
            consumer.first = (site, kind)
        count = site.count(kind)
        if consumer.at is site and consumer.at_kind == kind and count == call:
            return consumer.current
        if count >= call:
            raise OutOfOrderError(
                f"{site.describe(kind, call)} was requested in iteration {call - 1} of tracer.iter, "
                f"but the model has already made that call (it is at call {count}): access modules "
                "in the order the model runs them within each iteration"
            )
        iteration, consumer.iteration = consumer.iteration, None
        consumer.want = call
        try:
            return self.request(envoy, kind, fresh=True, soft=soft)
        finally:
            consumer.want = 0
            consumer.iteration = iteration

    def replace(self, envoy: Any, kind: str, value: Any) -> None:
        """Replace the value at ``envoy``'s boundary (waiting for it first)."""
        consumer = self.current_consumer()
        site = self.site(envoy)
        if not (consumer.at is site and consumer.at_kind == kind):
            self.request(envoy, kind)
        consumer.current, consumer.replaced = value, True

    def skip(self, envoy: Any, value: Any) -> None:
        """Make the next call of ``envoy``'s module return ``value`` unrun."""
        consumer = self.current_consumer()
        if consumer.rows is not None and len(self.consumers) > 1:
            raise TraceStateError(
                "module.skip() replaces the module for the whole batch; use it in a "
                "trace with a single input, or assign .output per invoke instead"
            )
        site = self.site(envoy)
        if consumer.at is site and consumer.at_kind == "output":
            raise OutOfOrderError(
                f"cannot skip {display_of(site.envoy)}: the model has already run it "
                f"(the trace is at {site.describe('output')}). Call .skip() before "
                "accessing the module's output."
            )
        site.skip_value = value

    def _check_can_wait(self, site: Site, kind: str) -> None:
        if self.state not in ("new", "running"):
            raise finished_error(site.describe(kind), self.state, self._where())

    def _clear_wait(self, consumer: Consumer) -> None:
        site = consumer.waiting
        if site is None:
            return
        if consumer.waiting_kind == "input":
            site.waiting_in -= 1
        else:
            site.waiting_out -= 1
        consumer.waiting = None

    def _wait(self, consumer: Consumer) -> None:
        user_grad = _is_grad_enabled()
        if user_grad != self.model_grad:
            _set_grad_enabled(self.model_grad)
        if consumer.run is not None:
            message = self.runner_glet.switch()
        elif self.state == "running":  # _drive, inlined for the common case
            self.runner.driver = self.driver
            message = self.runner_glet.switch()
            if message is TASK_ENDED:
                self._collect()
        else:
            message = self._drive()
        self.model_grad = _is_grad_enabled()
        if user_grad != self.model_grad:
            _set_grad_enabled(user_grad)
        if message is TASK_ENDED:
            if consumer.soft and self.state not in ("error",):
                self._clear_wait(consumer)
                return TASK_ENDED
            self._raise_for_driver_wait(consumer)
        return message

    def _drive(self) -> Any:
        """Driver only: resume the model (starting it if needed)."""
        self.runner.driver = self.driver
        if self.state == "new":
            if self.task is None:
                raise TraceStateError("this trace has no input to run the model on")
            self.state = "running"
            message = self.runner_glet.switch(self.task)
        else:
            message = self.runner_glet.switch()
        if message is TASK_ENDED:
            self._collect()
        return message

    def _collect(self) -> None:
        kind, payload = self.runner.take_outcome()
        if kind == "done":
            self.state, self.result = "done", payload
        elif kind == "error":
            self.state, self.error = "error", payload
        else:
            self.state = "stopped" if self.stop_requested else "aborted"

    def _raise_for_driver_wait(self, consumer: Consumer) -> None:
        if consumer.waiting is None:
            return
        site, kind = consumer.waiting, consumer.waiting_kind
        self._clear_wait(consumer)
        if self.state == "error":
            error, self.error = self.error, None
            self.state = "reported"
            raise error  # type: ignore[misc]
        if self.state == "stopped":
            raise TraceStateError(
                f"cannot access {site.describe(kind)}: the model was stopped by tracer.stop()"
            )
        consumer.waiting, consumer.waiting_kind = site, kind
        error = self._missed_error(consumer)
        consumer.waiting = None
        raise error

    def _missed_error(self, consumer: Consumer) -> Exception:
        site = consumer.waiting
        assert site is not None
        before = consumer.requested_at
        hint = self.root._missed_hint(site.envoy) if before is None and not consumer.want else None
        return missed_error(site, consumer.waiting_kind, consumer.want, consumer.name,
                            None if before is None else self._where(before), hint)

    def _where(self, position: tuple[Site, str, int] | None = None) -> str:
        position = position or self.position
        if position is None:
            return "the start of the forward"
        site, kind, call = position
        return site.describe(kind, call)

    # ------------------------------------------------------------ lifecycle

    def stop(self) -> None:
        """End the model's execution early (``tracer.stop()``)."""
        self.stop_requested = True
        if _getcurrent() is self.driver and self.state == "running":
            self.runner.driver = self.driver
            message = self.runner_glet.throw(Abort())
            if message is TASK_ENDED:
                self._collect()
        elif self.state == "new":
            self.state = "stopped"

    def finish(self) -> Any:
        """Driver: run the model to the end and raise what went wrong."""
        for consumer in self.consumers:
            if consumer.run is None:
                if consumer.waiting is not None:
                    self._clear_wait(consumer)
                consumer.at = None
        if self.state in ("new", "running"):
            while self._drive() is not TASK_ENDED:
                raise TraceStateError("internal: the runner returned to the driver mid-forward")
        if self.consumer_error is not None:
            error, self.consumer_error = self.consumer_error, None
            raise error
        if self.state == "error":
            error, self.error = self.error, None
            self.state = "reported"
            raise error  # type: ignore[misc]
        return self.result

    def cleanup(self) -> None:
        """Leave nothing behind: unwind the model, end invoke greenlets,
        restore every wrapped ``forward``. Safe to call more than once."""
        here = _getcurrent()
        for consumer in self.consumers:
            glet = consumer.glet
            if consumer.run is not None and glet is not None and not glet.dead:
                glet.parent = here
                try:
                    glet.throw(greenlet.GreenletExit())
                except greenlet.GreenletExit:
                    pass
        if self.state == "running":
            self.runner.driver = here
            try:
                message = self.runner_glet.throw(Abort())
                if message is TASK_ENDED:
                    self.runner.take_outcome()
            finally:
                self.state = "aborted"
        for site in reversed(self.sites.values()):  # one pass, last installed first
            site.interleaver = None
            if site.recorders:
                site.recorders = []
            if site.container:  # never installed
                continue
            saved, site.saved_forward = site.saved_forward, None
            if saved is MISSING:
                site.namespace.pop("forward", None)
            else:
                site.namespace["forward"] = saved
        self.sites.clear()
        self.envoy_sites.clear()
        self.consumers.clear()
        self.by_glet.clear()
        self.task = None
        self.position = None
        if self.runner is not None:
            release_runner(self.runner)
            self.runner = None  # type: ignore[assignment]
            self.runner_glet = None
