"""``from glassbox.intervention.envoy import Envoy``: where nnsight 0.8 users import it
(``nnsight.intervention.envoy``). The class is glassbox.envoy.Envoy, also ``glassbox.Envoy``."""

from ..envoy import Envoy

__all__ = ["Envoy"]
