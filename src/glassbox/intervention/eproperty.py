"""``from glassbox.intervention.eproperty import eproperty``: the name at nnsight 0.8's path
(``nnsight.intervention.eproperty``), as a stand-in that raises when used (see _absent.py)."""

from ._absent import absent

eproperty = absent(
    __name__, "eproperty",
    "it declares the hooked properties of nnsight's Envoy (.output, .input, ...) for Envoy "
    "subclasses to add their own. glassbox's Envoy serves .output, .input, .inputs and .source "
    "itself and takes no new ones; a custom model overrides NNsight's _batch_size / _batch "
    "(see glassbox.models.base).",
)

__all__ = ["eproperty"]
