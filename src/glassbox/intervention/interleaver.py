"""``from glassbox.intervention.interleaver import ...``: the names at nnsight 0.8's path
(``nnsight.intervention.interleaver``).

    OutOfOrderError      glassbox.errors.OutOfOrderError (also ``glassbox.OutOfOrderError``)
    EarlyStopException   glassbox.errors.TraceStopped: how ``tracer.stop()`` leaves its block
                         (its trace catches it, as nnsight's does)
    Interleaver, Mediator, Event, Pending
                         stand-ins that raise when used (see _absent.py): nnsight's
                         interleaver drives one worker (a Mediator) per invoke, parked on
                         events; glassbox runs the block inline and the model in a greenlet
                         that meets it at module boundaries (glassbox/interleave.py, made by
                         each trace and not a public API), so it has none of them.
"""

from ..errors import OutOfOrderError, TraceStopped
from ._absent import absent

_INSTEAD = "write the intervention in a `with model.trace(...)` block (and `tracer.invoke(...)`)."

Interleaver = absent(
    __name__, "Interleaver",
    "it is driven by hand with Mediators. A glassbox trace makes its own interleaver for one "
    "forward (glassbox/interleave.py, not a public API); " + _INSTEAD,
)
Mediator = absent(
    __name__, "Mediator",
    "it runs one invoke's block as a worker parked on interleaver events. glassbox runs the "
    "block inline and the model in a greenlet, so there is no worker to build or inspect; " + _INSTEAD,
)
Event = absent(
    __name__, "Event",
    "it names what a Mediator waits for (a value, a swap, ...); glassbox has no Mediators. "
    "An OutOfOrderError names the module asked for and where the model was.",
)
Pending = absent(
    __name__, "Pending",
    "it is a Mediator's parked request (event, location, occurrence); glassbox has no Mediators. "
    "An OutOfOrderError names the module asked for and where the model was.",
)
EarlyStopException = TraceStopped

__all__ = ["EarlyStopException", "Event", "Interleaver", "Mediator", "OutOfOrderError", "Pending"]
