"""``from glassbox.intervention.barrier import Barrier``: the name at nnsight 0.8's path
(``nnsight.intervention.barrier``), as a stand-in that raises when used (see _absent.py).

nnsight's Barrier is what ``tracer.barrier(n)`` returns. glassbox's ``tracer.barrier(n)`` returns a
plain function that does nothing (invokes meet in order here, see Tracer.barrier): a function, so
that a block which reads it can still be sent to a server (glassbox/remote/protocol.py sends plain
functions and no objects of other classes).
"""

from ._absent import absent

Barrier = absent(
    __name__, "Barrier",
    "it is what nnsight's tracer.barrier(n) returns, for invokes that wait for each other at one "
    "module. Call tracer.barrier(n) (glassbox accepts it and needs none: invokes are served in "
    "order, and a later one waits for a name an earlier one sets).",
)

__all__ = ["Barrier"]
