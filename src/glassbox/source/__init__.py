"""``envoy.source``: the calls inside a module's forward as envoys (nnsight 0.8's ``.source``).

Offers:
    Source, Operation   see ops.py (``envoy.source`` and the module behind each op)

    print(model.model.layers[0].self_attn.source)            # the forward, each call's op name beside it
    with model.trace("hello"):
        q = model.model.layers[0].self_attn.source.self_q_proj_0.output.save()

This package owns ``.source``: rewriting a forward so that each call can be intercepted
(rewrite.py), the printed listing (listing.py), and the op modules, their envoys and the
dispatcher (ops.py). It may import glassbox.envoy, glassbox.intercept and glassbox.errors, never the
tracing layer above them. envoy.py cannot import it (this package imports envoy.py), so importing
this package registers its factory there; glassbox/__init__ imports it, so it is always registered.
"""

from ..envoy import set_source_factory
from .ops import Operation, Source, make_source

set_source_factory(make_source)

__all__ = ["Operation", "Source"]
