"""``from glassbox.intervention.interleaver import OutOfOrderError``: where nnsight 0.8 users
import it (``nnsight.intervention.interleaver``). The class is glassbox.errors.OutOfOrderError,
also ``glassbox.OutOfOrderError``."""

from ..errors import OutOfOrderError

__all__ = ["OutOfOrderError"]
