"""nnsight 0.8.1's own tests (bench/nnsight_suite.sh) run against glassbox: the user-level
differences they found, each checked here on a small real torch model.

Import paths nnsight users write, CONFIG sections under pytest's monkeypatch, a module read after
``tracer.iter``, the wording of nnsight's messages that code may match, and aliases around a
submodule named ``output``.
"""

from __future__ import annotations

import pytest
import torch

import glassbox
from glassbox import CONFIG, Envoy, NNsight, OutOfOrderError


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)
        self.output = torch.nn.Linear(4, 4)  # nnsight's Envoy.output: moved to E_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.linear(x))


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = Block()
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x))


@pytest.fixture
def net() -> Net:
    torch.manual_seed(0)
    return Net()


def test_envoy_imports_from_nnsights_path():
    from glassbox.intervention.envoy import Envoy as ported

    assert ported is Envoy


def test_monkeypatch_of_a_config_section_sets_it(monkeypatch):
    monkeypatch.setattr(CONFIG, "DEBUG", CONFIG.DEBUG)  # whatever this test leaves, put back
    CONFIG.APP.DEBUG = True  # a value set in code before the monkeypatch
    inner = pytest.MonkeyPatch()
    inner.setattr(CONFIG.APP, "DEBUG", False)
    assert CONFIG.APP.DEBUG is False and CONFIG.DEBUG is False
    inner.setattr(CONFIG.APP, "PYMOUNT", False)
    inner.undo()  # pytest >= 9 deletes a name it found in no instance __dict__
    assert CONFIG.APP.DEBUG is True and CONFIG.APP.PYMOUNT is True


def test_del_of_a_config_section_setting_restores_its_default(monkeypatch):
    monkeypatch.delenv("GLASSBOX_DEBUG", raising=False)
    monkeypatch.setenv("GLASSBOX_CONFIG", "/nonexistent/glassbox-config")
    monkeypatch.setattr(CONFIG, "DEBUG", CONFIG.DEBUG)
    CONFIG.APP.DEBUG = True
    del CONFIG.APP.DEBUG
    assert CONFIG.APP.DEBUG is False
    CONFIG.API.COMPRESS = False
    del CONFIG.API.COMPRESS
    assert CONFIG.API.COMPRESS is True
    with pytest.raises(AttributeError, match="has no setting 'NOPE'"):
        del CONFIG.APP.NOPE
    assert isinstance(glassbox.config.Config().APP.DEBUG, bool)


class Loop(torch.nn.Module):
    """One block applied at each of ``steps`` steps (nnsight's iteration test model)."""

    def __init__(self, steps: int = 5) -> None:
        super().__init__()
        self.block = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 8)
        self.steps = steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        for _ in range(self.steps):
            x = self.block(x)
            outs.append(x)
        return self.head(torch.stack(outs))


@pytest.fixture
def loop() -> NNsight:
    torch.manual_seed(0)
    return NNsight(Loop())


def test_a_read_after_an_iter_loop_means_the_first_call_again(loop):
    x = torch.randn(2, 8)
    with pytest.raises(OutOfOrderError, match=r"after a tracer\.iter loop"):
        with loop.trace(x) as tracer:
            for _ in tracer.iter[:2]:
                loop.block.output
            loop.block.output  # nnsight: binds to step 0, already passed
    with loop.trace(x) as tracer:  # a module whose first call is still ahead reads as before
        for _ in tracer.iter[:2]:
            loop.block.output
        head = loop.head.output.save()
        again = loop.head.output.save()
    assert head.shape == (5, 2, 8) and again is head


def test_messages_carry_nnsights_wording(loop):
    x = torch.randn(2, 8)
    with pytest.warns(UserWarning, match="was never reached") as warned:
        with loop.trace(x) as tracer:
            for _ in tracer.iter[[0, 2, 7]]:
                loop.block.output
    assert "ran only 5 time(s)" in str(warned[0].message)  # and which module, how often
    with pytest.raises(ValueError, match="before reading or modifying"):
        with loop.trace(x) as tracer:
            loop.head.output = loop.head.output
            tracer.cache(modules=[loop.head])
    with pytest.raises(ValueError, match="outside a trace"):
        glassbox.save([])
    with pytest.raises(ValueError, match="outside a trace"):
        [1, 2, 3].save()


def test_rename_reaches_a_moved_submodule_by_its_attribute(net):
    with pytest.warns(UserWarning, match="already serves"):
        renamed = NNsight(net, rename={"block.E_output": "inner"})
    assert renamed.inner is renamed.block.E_output
    x = torch.randn(3, 4)
    with renamed.trace(x):
        inner = renamed.inner.output.save()
        block = renamed.block.output.save()
    assert torch.equal(inner, block) and torch.allclose(block, net.block(x))


def test_rename_of_a_served_value_or_onto_a_moved_name_raises(net):
    with pytest.raises(ValueError, match="outside of interleaving") as served:
        with pytest.warns(UserWarning, match="already serves"):
            NNsight(net, rename={"block.output": "inner"})
    assert "'block.E_output'" in str(served.value)  # and the key that names the submodule
    with pytest.raises(ValueError, match="already bound here from 'output'"):
        with pytest.warns(UserWarning, match="already serves"):  # the move is still reported
            NNsight(net, rename={"linear": "E_output"})  # resolves on block, which moved output


def test_a_co_tenant_requests_length_counts_the_padding_its_encoding_has():
    from glassbox.models.language import LanguageModel
    from glassbox.offline import tiny_gpt2_path
    from glassbox.server.jobs.cotenant import padded_width

    model = LanguageModel(tiny_gpt2_path())
    padded = model._prepare(({"input_ids": [[0, 0, 5, 6]], "attention_mask": [[0, 0, 1, 1]]},), {})
    plain, one = model._prepare(({"input_ids": [[5, 6]]},), {}), model._prepare(({"input_ids": [[7]]},), {})
    assert padded.rows == plain.rows == [[5, 6]]
    # the padded one keeps the width its encoding has (4) in a batch; the plain one needs 2
    assert padded_width(model, [padded, one]) >= 4 > padded_width(model, [plain, one]) >= 2
