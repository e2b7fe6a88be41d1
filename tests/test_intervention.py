"""glassbox.intervention: nnsight 0.8's import paths (``nnsight.intervention.*`` with ``glassbox``
for ``nnsight``). Re-exported names are glassbox's own objects; nnsight internals glassbox has no
counterpart for import, and any use of them raises NotImplementedError saying what to do instead."""

from __future__ import annotations

import pickle

import pytest
import torch

import glassbox
from glassbox.intervention import eproperty as eproperty_module
from glassbox.intervention import interleaver as interleaver_module
from glassbox.intervention.barrier import Barrier
from glassbox.intervention.envoy import Envoy
from glassbox.intervention.eproperty import eproperty
from glassbox.intervention.interleaver import (
    EarlyStopException,
    Event,
    Interleaver,
    Mediator,
    OutOfOrderError,
    Pending,
)

STAND_INS = [Interleaver, Mediator, Event, Pending, Barrier, eproperty]


def test_re_exports_are_glassboxs_own_objects():
    assert Envoy is glassbox.Envoy
    assert OutOfOrderError is glassbox.OutOfOrderError
    assert sorted(interleaver_module.__all__) == sorted(
        ["EarlyStopException", "Event", "Interleaver", "Mediator", "OutOfOrderError", "Pending"])
    assert eproperty_module.__all__ == ["eproperty"]


@pytest.mark.parametrize("stand_in", STAND_INS, ids=lambda c: c.__name__)
def test_a_stand_in_raises_on_use_with_what_to_do(stand_in):
    path = f"nnsight.intervention.{stand_in.__module__.rsplit('.', 1)[1]}.{stand_in.__name__}"
    message = rf"^{path} has no glassbox counterpart: "
    with pytest.raises(NotImplementedError, match=message) as called:
        stand_in()
    with pytest.raises(NotImplementedError) as read:
        stand_in.VALUE  # an attribute, as Event.VALUE or Mediator.value
    assert str(read.value) == str(called.value) == stand_in.__doc__
    assert "glassbox" in str(called.value).split("counterpart:", 1)[1]  # says what glassbox does
    assert not hasattr(stand_in, "__wrapped__")  # introspection sees a plain class


def test_early_stop_is_how_stop_leaves_the_block():
    # as in nnsight: tracer.stop() raises it, the trace catches it, the lines after do not run
    model = glassbox.NNsight(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)))
    caught = []
    with model.trace(torch.randn(1, 2)) as tracer:
        first = model[0].output.save()
        try:
            tracer.stop()
        except EarlyStopException:
            caught.append("the block sees it, as nnsight's does")
    with model.trace(torch.randn(1, 2)) as tracer:
        tracer.stop()
        caught.append("never")
    assert first.shape == (1, 2) and caught == ["the block sees it, as nnsight's does"]


def test_barrier_at_nnsights_path_points_to_tracer_barrier():
    assert "tracer.barrier(n)" in Barrier.__doc__
    model = glassbox.NNsight(torch.nn.Linear(2, 2))
    with model.trace() as tracer:
        barrier = tracer.barrier(2)  # what ported code writes: accepted, and it does nothing
        with tracer.invoke(torch.randn(1, 2)):
            barrier()
    assert not isinstance(barrier, Barrier)


def test_stand_ins_are_not_in_glassboxs_public_api():
    for stand_in in STAND_INS:
        assert not hasattr(glassbox, stand_in.__name__)


def test_the_compat_modules_import_nothing_into_glassbox():
    # `import glassbox` does not load the compat package (nothing in glassbox imports it)
    import subprocess
    import sys

    code = "import sys, glassbox; print(any(m.startswith('glassbox.intervention') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_stand_in_class_pickles_by_reference():
    assert pickle.loads(pickle.dumps(Mediator)) is Mediator
