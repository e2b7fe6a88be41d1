"""The errors of a request the model could not serve: what happened, in the user's terms.

Offers:
    finished_error(wanted, state, where)
        the trace's model has stopped or finished before the request was made
    missed_error(site, kind, want, consumer_name, requested_where, hint)
        the forward ended while a body was still waiting for a module's value

Kept apart from interleave.py, whose per-access path they are not on: the interleaver
gathers the facts (where the model was, which call was wanted) and these only word them.
"""

from __future__ import annotations

from typing import Any

from .errors import MissedModuleError, OutOfOrderError, TraceStateError


def finished_error(wanted: str, state: str, where: str) -> Exception:
    """A request for ``wanted`` (``model.layers[0].output``) after the model ended (``state``:
    "stopped" by tracer.stop(), else finished), its last boundary at ``where``."""
    if state == "stopped":
        return TraceStateError(
            f"cannot access {wanted}: the model was stopped by tracer.stop() at {where}"
        )
    return OutOfOrderError(
        f"cannot access {wanted}: the model has already finished (last boundary: {where})"
    )


def missed_error(site: Any, kind: str, want: int, consumer_name: str, requested_where: str | None,
                 hint: str | None) -> Exception:
    """The forward ended while ``consumer_name`` waited for ``site``'s ``kind`` value (its call
    ``want`` in a tracer.iter iteration; 0: the next call). ``requested_where``: where the model
    was when the request was made (None: before it started); ``hint``: the model's advice for a
    module that never ran."""
    count = site.count(kind)
    if want and count == 0 and requested_where is not None:
        return OutOfOrderError(  # its Site came after the model had started: it may have run
            f"{site.describe(kind, want)} was requested (iteration {want - 1} of "
            f"tracer.iter) while the model was at {requested_where}, and the "
            "forward finished without reaching it. Either it ran earlier (access modules in the "
            "order the model runs them) or it does not run for this input."
        )
    if want:
        return MissedModuleError(
            f"{site.describe(kind, want)} was requested (iteration {want - 1} of "
            f"tracer.iter) but the module ran only {count} time(s) in this forward"
        )
    wanted = site.describe(kind)
    if count > 0 and requested_where is not None:
        return OutOfOrderError(
            f"{wanted} was requested after the model had already passed it: it ran "
            f"before {requested_where}, where this {consumer_name} was, and did not "
            "run again. Access modules in the order the model runs them."
        )
    if requested_where is None:
        return MissedModuleError(
            f"{wanted} was requested but the module never ran during this forward pass. "
            + (hint or "Check that the model uses it for this input (print(model) shows the tree).")
        )
    return OutOfOrderError(
        f"{wanted} was requested while the model was at {requested_where} "
        f"({consumer_name}), and the forward finished without reaching it. Either it "
        "ran earlier (access modules in the order the model runs them) or it does "
        "not run for this input."
    )
