"""The host of a shared pass: ONE forward for several requests, in a process that runs no user code.

Offers:
    run_host(models, requests, links) -> bool
                        run the requests' forward as one batch, each request's rows relayed to its
                        body process over its link (a socket's descriptor; ``split_body.py``);
                        True if the pass stood

What runs here: the model's own code, glassbox's interleaver and, per body, the relay below (a
consumer of the forward like any invoke). A relay does four things for its body and nothing else:

- ``get``: ``interleaver.request`` for a module found by its path in the model's tree (children by
  name: no attribute of anything else is reached); the value is this body's own rows, a copy
  (``batching.own_copy``), sent as data;
- ``edit``: the body changed that value in place: its tensors are copied into the copy it was
  given (which the interleaver copies back into the batch), if every shape and dtype match;
- ``replace``: the body assigned a new value there: used if it has exactly the layout (shapes,
  dtypes, containers) of the value it replaces, so it can only ever land on its own rows;
- ``done`` / ``leave``: the relay ends; a body that left runs alone in its own process.

Anything else, or a value of another layout, ends that body's part in the pass (it runs alone
and meets its own error there); its neighbours go on. The model's buffers and weights are not
checked afterwards, unlike an in-process batch (cotenant.py): no code but the model's own writes
anything here, and what a body sends lands only in activations of its own rows.

If the forward fails, every body of the pass runs again alone (the verdict each one waits for).
"""

from __future__ import annotations

import builtins
from typing import Any

import torch

from ...envoy import children_of
from ...errors import GlassboxError
from ...remote.job import JobRequest
from ...tracing import Body, run_together
from . import served
from .cotenant import padded_width
from .split_link import NOTHING, Link, LinkClosed

__all__ = ["run_host"]

_RELAY = compile("glassbox_relay()", "<glassbox relay>", "exec")
_KINDS = ("output", "input")
_SLACK = 1 << 16  # bytes of a body's message beyond the value it sends back (JSON, descriptions)


class _Relay:
    """One body's relay (see the module docstring); ``run`` is its consumer's code."""

    def __init__(self, model: Any, link: Link) -> None:
        self.model, self.link = model, link
        self.done = False
        self.at: tuple[Any, str] | None = None  # the envoy and kind of the value the body holds
        self.current: Any = None
        self.sent = 0  # bytes of the last value sent: what the body may send back is about that

    def run(self) -> None:
        try:
            while self._step():
                pass
        except LinkClosed:  # the body is gone (or spoke outside the grammar): its rows run on unused
            pass

    def _step(self) -> bool:
        # A body sends back at most the value it was handed (edited or replaced with the same
        # layout): a larger frame is refused before it is read, so no body can make the host
        # allocate more than twice what it sent it.
        message, value = self.link.receive(limit=2 * self.sent + _SLACK)
        op = message["op"]
        if (message.get("edit") or message.get("replace")) and not self._take(message, value):
            return self._alone("the value sent back does not fit the one it replaces")
        self.at, self.current, self.sent = None, None, 0
        if op == "done":
            self.done = True
            return False
        if op != "get":
            return False  # "leave", or outside the grammar
        envoy, kind = _resolve(self.model, message.get("path")), message.get("kind")
        if envoy is None or kind not in _KINDS:
            return self._alone("a module this pass does not have")
        try:
            got = self.model.active.request(envoy, kind, fresh=message.get("fresh") is True)
        except GlassboxError as err:  # as the body's own request would have failed alone
            self.link.send({"op": "error", "type": type(err).__name__, "message": str(err)})
            return True
        try:
            self.sent = self.link.send({"op": "value"}, got)
        except LinkClosed:
            raise
        except Exception:  # a value the protocol cannot carry (ProtocolError, a huge one)
            return self._alone("a value that cannot be sent to a body")
        self.at, self.current = (envoy, kind), got
        return True

    def _take(self, message: dict, value: Any) -> bool:
        if self.at is None or value is NOTHING or not _same_layout(self.current, value):
            return False
        if message.get("replace"):
            envoy, kind = self.at
            self.model.active.replace(envoy, kind, value)
        else:
            _copy_into(self.current, value)
        return True

    def _alone(self, why: str) -> bool:
        self.link.send({"op": "alone", "why": why})
        return False

    def verdict(self, ok: bool) -> None:
        try:
            if self.done:
                self.link.send({"op": "verdict", "ok": ok})
        except LinkClosed:
            pass
        finally:
            self.link.close()


def _resolve(model: Any, path: Any) -> Any:
    """The envoy at ``path`` in ``model``'s tree (children by name only), or None."""
    if not isinstance(path, str) or len(path) > 4096:
        return None
    envoy = model
    for part in path.split(".") if path else ():
        envoy = children_of(envoy).get(part)
        if envoy is None:
            return None
    return envoy


def _same_layout(old: Any, new: Any, depth: int = 0) -> bool:
    """Whether ``new`` has ``old``'s layout: tensors of the same shape and dtype, containers of the
    same kind and length (keys), other values of the same type."""
    if isinstance(old, torch.Tensor):
        return (type(new) is torch.Tensor and new.shape == old.shape and new.dtype == old.dtype
                and new.layout == torch.strided)
    if depth > 8 or type(new) is not type(old):
        return False
    if isinstance(old, dict):
        return old.keys() == new.keys() and all(_same_layout(old[k], new[k], depth + 1) for k in old)
    if isinstance(old, (list, tuple)):
        return len(old) == len(new) and all(_same_layout(a, b, depth + 1) for a, b in zip(old, new))
    return True


def _copy_into(old: Any, new: Any, depth: int = 0) -> None:
    """``new``'s tensors copied into ``old``'s (``_same_layout`` holds)."""
    if isinstance(old, torch.Tensor):
        with torch.no_grad():
            old.copy_(new)
    elif isinstance(old, dict) and depth <= 8:
        for key in old:
            _copy_into(old[key], new[key], depth + 1)
    elif isinstance(old, (list, tuple)) and depth <= 8:
        for a, b in zip(old, new):
            _copy_into(a, b, depth + 1)


def run_host(models: dict[str, Any], requests: list[JobRequest], links: list[int]) -> bool:
    """Run one forward for ``requests`` (one model), request i's rows relayed over ``links[i]``."""
    ends = [Link.from_fd(fd) for fd in links]
    relays: list[_Relay] = []
    ok = False
    try:
        model = served.use_model(models, requests[0].model)
        relays = [_Relay(model, link) for link in ends]
        prompts = [model._prepare(tuple(r.decoded(numpy_as_tensor=True).inputs), {}) for r in requests]
        bodies = [Body(_RELAY, {"__builtins__": builtins, "glassbox_relay": relay.run}, prompt,
                       f"request {i}") for i, (relay, prompt) in enumerate(zip(relays, prompts))]
        try:
            with torch.no_grad():
                run_together(model, bodies, pad_to=padded_width(model, prompts))
        finally:
            model.active = None
        ok = True
    except Exception:  # the pass failed: each body runs alone (it hears so below)
        ok = False
    finally:
        for relay in relays:
            relay.verdict(ok)
        for link in ends[len(relays):]:
            link.close()
    return ok
