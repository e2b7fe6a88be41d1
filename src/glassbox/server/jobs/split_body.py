"""A request's body in a shared pass: its code runs here, in a process of its own; the model runs
in the host process (``split_host.py``), which hands this body only its own rows.

Offers:
    run_body(models, request, link_fd, log=, limits=, lone=False) -> JobResult
                        run one request of a co-tenant batch as a body of the host's pass; when it
                        asks for what a shared pass cannot give it (or the pass fails), run it
                        alone, here, from the start
    HostView(model, link)   what ``model.active`` is in a body process: module values from the host
    NeedsAlone          raised in the body's code when it leaves the pass (a BaseException: code
                        that catches Exception cannot keep it in the pass)

How a body meets the host::

    body process (this request only)             host process (the model; no user code)
    ────────────────────────────────             ──────────────────────────────────────
    exec(block) with model.active = HostView
      layer.output  ─► HostView.request ── get ──► relay: interleaver.request(layer, "output")
                     ◄──── value (own rows) ─────        (waits for the forward to get there)
      layer.output[:] = 0   (in place)
      next access / end ─ get|done + edit ───────► copied into its rows before the model goes on
      anything else (.source, hook=True, tracer, cache, skip, iteration, gradients...), or an
      error from the model's side (out of order, a module that never ran)
                    ─► NeedsAlone ─── leave ─────► relay ends; its rows run on unused
                       run_job(request) here: the whole request alone, in this process
    block ended ─ done (hand_back) ──────────────► the host finishes its forward, while the
      the reply encoded ◄─── verdict ───────────        body encodes its reply; kept if it stood

Why this is safe: the body process was forked from the zygote (it holds no other request's
bytes), confined like any job's process, and its model is its own copy-on-write copy with
read-only weights: what it does to its model, its torch or its memory stays here. The host runs
only glassbox's relay, which resolves module paths in the model's tree and moves tensors whose
shapes and types match what it handed out; the rest is the model's own code.

Why rerunning alone is exact: a body's block runs from its first line again, in a fresh
namespace, from the job's seed; what it saved in the pass is dropped, and so is what it printed
(held back until the pass stands). A lone job's pass (a pass of one, ``lone``) shows its output as
it is printed, as a job alone does; its rerun then shows only what comes after that.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from ...envoy import path_of, root_of
from ...remote.executor import seed_job
from ...remote.job import JobRequest, JobResult
from ...tracing import collect_saved
from . import execute, served
from .job_warnings import captured
from .split_link import NOTHING, Link, LinkClosed

__all__ = ["HostView", "NeedsAlone", "run_body"]

class NeedsAlone(BaseException):
    """This body asked for something a shared pass cannot give a body; it runs alone instead."""


class _AloneTracer:
    """What the block's tracer name means in a shared pass: any use of it leaves the pass."""

    def __getattr__(self, name: str) -> Any:
        raise NeedsAlone(f"tracer.{name}")

    def __enter__(self) -> Any:
        raise NeedsAlone("with tracer")


class HostView:
    """``model.active`` in a body process: module values come from the host, over the link.

        model.active = HostView(model, link)
        model.layer.output          # -> this body's rows, fetched from the host
    """

    def __init__(self, root: Any, link: Link) -> None:
        self.root, self.link = root, link
        self.key: tuple[str, str] | None = None  # (path, kind) of the value this body holds now
        self.current: Any = None
        self.versions: list[int] = []
        self.replaced = False
        self.left: str | None = None  # why this body left the pass
        self.handed_back = False  # the block ended and said so (``hand_back``)

    # the consumer side of an Interleaver (interleave.py) that a plain block uses

    def request(self, envoy: Any, kind: str, fresh: bool = False, soft: bool = False) -> Any:
        if soft:
            self.leave("tracer.iter")
        path = self._where(envoy)
        if not fresh and self.key == (path, kind):
            return self.current
        _, value = self._ask({"op": "get", "path": path, "kind": kind, "fresh": bool(fresh)})
        self.key, self.current, self.replaced = (path, kind), value, False
        self.versions = _versions(value)
        return value

    def replace(self, envoy: Any, kind: str, value: Any) -> None:
        path = self._where(envoy)
        if self.key != (path, kind):
            self.request(envoy, kind)  # wait for it first, as an Interleaver does
        self.current, self.replaced = value, True

    def __getattr__(self, name: str) -> Any:
        # skip, hooked_call (hook=True), site (.source, cache), request_call and current_consumer
        # (iteration), state, position...: the model itself, which stays in the host
        self.leave(name)

    # the pass

    def leave(self, why: str) -> Any:
        if self.left is None:
            self.left = why
            try:
                self.link.send({"op": "leave", "why": why})
            except LinkClosed:
                pass
        raise NeedsAlone(why)

    def hand_back(self) -> None:
        """The block ended: hand back its last edits; the host goes on with its forward."""
        self.handed_back = True
        self._tell({"op": "done"})

    def stood(self) -> bool:
        """Whether the shared pass stood (after ``hand_back``): the host's verdict, at the forward's end."""
        message, _ = self._hear()
        return message.get("op") == "verdict" and message.get("ok") is True

    def _where(self, envoy: Any) -> str:
        if self.left is not None:
            raise NeedsAlone(self.left)
        if root_of(envoy) is not self.root:
            self.leave("another model")
        return path_of(envoy)

    def _ask(self, message: dict) -> tuple[dict, Any]:
        self._tell(message)
        return self._hear()

    def _tell(self, message: dict) -> None:
        if self.left is not None:
            raise NeedsAlone(self.left)
        value = NOTHING
        if self.key is not None and self.replaced:
            message, value = {**message, "replace": True}, self.current
        elif self.key is not None and _versions(self.current) != self.versions:
            message, value = {**message, "edit": True}, self.current
        self.key, self.replaced = None, False  # the host moves on: this value is the body's own now
        try:
            self.link.send(message, value)
        except LinkClosed:
            self.left = "the shared pass ended"
            raise NeedsAlone(self.left) from None
        except Exception as err:  # a value that cannot travel (ProtocolError): run alone
            self.leave(f"cannot send {type(err).__name__}")

    def _hear(self) -> tuple[dict, Any]:
        if self.left is not None:
            raise NeedsAlone(self.left)
        try:
            reply, got = self.link.receive()
        except LinkClosed:
            self.left = "the shared pass ended"
            raise NeedsAlone(self.left) from None
        except Exception as err:  # what the host sent cannot be read: run alone
            self.leave(f"cannot receive {type(err).__name__}")
        op = reply.get("op")
        if op == "value" and got is not NOTHING:
            return reply, got
        if op == "error":  # alone, it meets the same error, worded as a lone run words it
            self.leave(f"an error: {reply.get('type')}")
        if op == "verdict":
            return reply, NOTHING
        self.left = str(reply.get("why", "the host"))
        raise NeedsAlone(self.left)


def _versions(value: Any, depth: int = 0) -> list[int]:
    """The version counters of the tensors in ``value``: they change when it is edited in place."""
    if isinstance(value, torch.Tensor):
        return [value._version]
    if depth > 4:
        return []
    if isinstance(value, dict):
        return [v for item in value.values() for v in _versions(item, depth + 1)]
    if isinstance(value, (list, tuple)):
        return [v for item in value for v in _versions(item, depth + 1)]
    return []


def run_body(models: dict[str, Any], request: JobRequest, link_fd: int, *, log: Any,
             limits: dict | None = None, lone: bool = False) -> JobResult:
    """Run ``request`` as one body of the host's pass over the socket ``link_fd`` (see the module
    docstring); never raises for anything its code does. Its printed output goes to ``log`` once
    its result stands; in a pass of its own (``lone``) as it is printed."""
    limits = limits or {}
    link = Link.from_fd(link_fd)
    started = time.perf_counter()
    printed: list[str] = []
    shown = [0]  # characters already sent to ``log`` (a lone pass's live output)

    def say(text: str) -> None:
        if lone:
            log(text)
            shown[0] += len(text)
        else:
            printed.append(text)

    filename = execute.next_filename()
    model = None
    view: HostView | None = None
    with captured(filename) as warned:
        try:
            model = served.use_model(models, request.model)
            code = execute.job_code(request, filename, invoke=True)
            namespace = execute.job_namespace(model, request, say)
            namespace[request.tracer_name] = _AloneTracer()
            view = HostView(model, link)
            with collect_saved() as saved:
                model.active = view
                try:
                    exec(code, namespace)
                finally:
                    model.active = None
                view.hand_back()
                # Encoded while the host finishes its forward; kept only if the pass stands.
                reply = execute.job_reply(namespace, request, saved, limits)
                result = reply if view.stood() else None
        except NeedsAlone:
            result = None
        except Exception as exc:  # its own error, as alone: unless the pass failed under it
            result = execute.error_reply(exc, filename, request) if _stood(view) else None
        finally:
            if model is not None:
                model.active = None
            link.close()
    if result is None:  # alone, from the start, in this process, as if it had just begun (its warnings too)
        seed_job()
        return execute.run_job(models, request, log=_after(shown[0], log), limits=limits)
    for text in printed:
        log(text)
    return result.replace(seconds=round(time.perf_counter() - started, 4), threads=torch.get_num_threads(),
                          warnings=warned)


def _after(skip: int, log: Any) -> Any:
    """``log`` without the first ``skip`` characters: what a lone pass showed live already, printed
    again by the run alone (the same code on the same input, from the same seed)."""
    left = [skip]

    def show(text: str) -> None:
        if left[0] >= len(text):
            left[0] -= len(text)
            return
        text, left[0] = text[left[0]:], 0
        log(text)

    return show


def _stood(view: HostView | None) -> bool:
    """After the block raised: whether the pass it ran in stood (then the error is its own)."""
    if view is None:
        return True
    if view.left is not None:
        return False
    try:
        if not view.handed_back:
            view.hand_back()
        return view.stood()
    except NeedsAlone:
        return False
