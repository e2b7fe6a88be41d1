"""nnsight's module path ``nnsight.intervention``, so ported imports keep working with ``glassbox``
in place of ``nnsight`` (``from glassbox.intervention.interleaver import OutOfOrderError``,
``from glassbox.intervention.envoy import Envoy``). The
names live in glassbox's public API (``from glassbox import OutOfOrderError``)."""
