"""WeightGuard: every change to a module's weights is seen and undone exactly."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import glassbox
from glassbox.server.jobs.integrity import WeightGuard, _device_checksum, content_checksum


@pytest.fixture
def module() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2)).eval()


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().reshape(-1).view(torch.uint8)


def _assert_pristine(module: torch.nn.Module, reference: torch.nn.Module) -> None:
    now = dict(module.named_parameters()) | dict(module.named_buffers())
    then = dict(reference.named_parameters()) | dict(reference.named_buffers())
    assert now.keys() == then.keys()
    for name, tensor in now.items():
        expected = then[name]
        assert tensor.dtype == expected.dtype and tensor.shape == expected.shape, name
        assert torch.equal(_bytes(tensor), _bytes(expected)), name
        assert tensor.requires_grad == expected.requires_grad, name


def test_a_clean_module_verifies_clean(module):
    guard = WeightGuard(module)
    assert guard.verify() == [] and guard.restore() == []
    net = glassbox.NNsight(module)
    with net.trace(torch.randn(3, 4)):
        net[0].output[:] = 0  # editing activations is not editing weights
        net.output.save()
    assert guard.verify() == []


def test_data_zero_outside_the_sandbox_is_detected_and_restored_exactly(module):
    reference = copy.deepcopy(module)
    weight = module[0].weight
    guard = WeightGuard(module)
    version = weight._version
    weight.data.zero_()
    assert weight._version == version  # why version counters are not enough
    assert guard.verify() == ["0.weight"]
    assert guard.restore() == ["0.weight"]
    assert guard.verify() == [] and module[0].weight is weight
    _assert_pristine(module, reference)


def test_a_write_through_numpy_is_detected(module):
    reference = copy.deepcopy(module)
    guard = WeightGuard(module)
    version = module[2].bias._version
    module[2].bias.detach().numpy()[0] = 123.0
    assert module[2].bias._version == version
    assert guard.verify() == ["2.bias"]
    guard.restore()
    _assert_pristine(module, reference)


def test_a_single_bit_and_a_swap_are_detected(module):
    guard = WeightGuard(module)
    weight = module[0].weight
    bits = weight.detach().view(torch.int32)
    bits[1, 2] ^= 1  # the lowest mantissa bit
    assert guard.verify() == ["0.weight"]
    guard.restore()
    with torch.no_grad():
        weight[[0, 1]] = weight[[1, 0]].clone()  # same values, other places
    assert guard.verify() == ["0.weight"]
    guard.restore()
    assert guard.verify() == []


def test_structural_changes_are_undone(module):
    reference = copy.deepcopy(module)
    guard = WeightGuard(module)
    original_linear, original_bias = module[2], module[0].bias
    module[0].weight.data = torch.ones(4, 4)  # rebinding storage
    module[0].bias = torch.nn.Parameter(torch.zeros(4))  # another object
    module[1].running_mean.add_(1)  # a buffer
    module[1].weight.requires_grad_(False)
    module[0].register_buffer("extra", torch.ones(1))
    module[2] = torch.nn.Linear(4, 2)  # a whole submodule
    changed = guard.verify()
    assert set(changed) == {
        "0.weight", "0.bias", "1.running_mean", "1.weight", "0.extra", "2.weight", "2.bias"
    }
    assert set(guard.restore()) == set(changed)
    assert guard.verify() == []
    assert module[2] is original_linear and module[0].bias is original_bias
    assert not hasattr(module[0], "extra")
    _assert_pristine(module, reference)


def test_added_and_deleted_submodules_are_undone(module):
    reference = copy.deepcopy(module)
    guard = WeightGuard(module)
    module[0].probe = torch.nn.Linear(2, 2)
    batch_norm = module._modules.pop("1")  # deleted, the others keep their names
    assert set(guard.verify()) >= {"0.probe.weight", "0.probe.bias", "1.weight", "1.running_mean"}
    guard.restore()
    assert guard.verify() == [] and module[1] is batch_norm and not hasattr(module[0], "probe")
    _assert_pristine(module, reference)
    inputs = torch.randn(3, 4)
    assert torch.equal(module(inputs), reference(inputs))  # children run in their old order again


def test_dtype_changes_are_undone(module):
    reference = copy.deepcopy(module)
    guard = WeightGuard(module)
    floating = {n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_floating_point()}
    module.half()
    assert set(guard.verify()) == floating
    guard.restore()
    _assert_pristine(module, reference)


def test_deleted_parameters_come_back(module):
    guard = WeightGuard(module)
    weight = module[0].weight
    del module[0].weight
    assert guard.verify() == ["0.weight"]
    guard.restore()
    assert module[0].weight is weight and guard.verify() == []


def test_tied_weights_are_watched_under_every_name(gpt2_module):
    model = copy.deepcopy(gpt2_module)
    assert model.lm_head.weight is model.transformer.wte.weight
    guard = WeightGuard(model)
    model.lm_head.weight.data[0, 0] += 1
    assert set(guard.verify()) == {"transformer.wte.weight", "lm_head.weight"}
    guard.restore()
    assert guard.verify() == [] and model.lm_head.weight is model.transformer.wte.weight
    assert torch.equal(model.lm_head.weight, gpt2_module.lm_head.weight)


def test_envoys_are_accepted_and_grads_cleared(module):
    net = glassbox.NNsight(module)
    guard = WeightGuard(net)
    module(torch.randn(3, 4)).sum().backward()
    assert module[0].weight.grad is not None and guard.verify() == []  # grads are not weights
    guard.clear_grads()
    assert all(p.grad is None for p in module.parameters())


def test_without_a_copy_changes_are_still_reported(module):
    guard = WeightGuard(module, keep_copy=False)
    module[0].weight.data.mul_(2)
    assert guard.verify() == ["0.weight"]
    with pytest.raises(RuntimeError, match="no pristine copy"):
        guard.restore()


def test_keyed_guard(module):
    reference = copy.deepcopy(module)
    guard = WeightGuard(module, keyed=True)
    assert guard.verify() == []
    module[1].running_var.mul_(3)
    assert guard.verify() == ["1.running_var"]
    guard.restore()
    _assert_pristine(module, reference)


def test_offloaded_meta_placeholders_are_not_watched_and_the_rest_is():
    """accelerate's offload leaves meta placeholders in the module (the values live in its hooks'
    weights map and are swapped in per forward): the guard skips them, and still watches the rest."""
    module = torch.nn.Sequential(torch.nn.Linear(2, 2, device="meta"), torch.nn.Linear(2, 2))
    guard = WeightGuard(module)
    module[0].weight = torch.nn.Parameter(torch.empty(2, 2, device="meta"))  # what a forward's hook does
    assert guard.verify() == []
    with torch.no_grad():
        module[1].weight.add_(1)
    assert guard.verify() == ["1.weight"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool,
                                   torch.uint8, torch.complex128])
def test_checksums_see_position_and_every_bit(dtype):
    base = torch.arange(1, 9).to(dtype) if dtype != torch.bool else torch.tensor([True, False] * 4)
    assert content_checksum(base) == content_checksum(base.clone())
    assert content_checksum(base) != content_checksum(base.flip(0))
    assert _device_checksum(base.reshape(-1).view(torch.uint8), None) != _device_checksum(
        base.flip(0).reshape(-1).view(torch.uint8), None
    )


def test_checksums_are_bit_exact():
    zeros = torch.zeros(4)
    negative = zeros.clone()
    negative[2] = -0.0
    assert content_checksum(zeros) != content_checksum(negative)
    nan = torch.full((3,), float("nan"))
    assert content_checksum(nan) == content_checksum(nan.clone())
    strided = torch.arange(12.0).reshape(3, 4).t()
    assert content_checksum(strided) == content_checksum(strided.contiguous())
    assert content_checksum(torch.empty(0)) == content_checksum(torch.empty(0, 3))
    assert content_checksum(zeros, key=b"k1") != content_checksum(zeros, key=b"k2")


def test_device_checksum_is_deterministic_and_keyed():
    data = torch.from_numpy(np.random.default_rng(0).integers(0, 255, 1001, dtype=np.uint8))
    assert _device_checksum(data, None) == _device_checksum(data.clone(), None)
    assert _device_checksum(data, b"a") != _device_checksum(data, b"b")
    changed = data.clone()
    changed[500] ^= 1
    assert _device_checksum(data, None) != _device_checksum(changed, None)
