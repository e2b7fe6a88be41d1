"""Detect and undo changes to a served model's weights, after every job (``--isolation none``).

Offers:
    WeightGuard(module, keep_copy=True, keyed=False)
        .verify()       -> names of parameters / buffers that changed since the snapshot
        .restore()      -> put every changed one back exactly (content, dtype, device,
                           object identity, requires_grad, and every module's submodules,
                           parameters and buffers in their order); returns the names
        .clear_grads()  drop ``.grad`` of every parameter (a backward leaves them behind)
    content_checksum(tensor, key=None)

The sandbox blocks the write paths it knows; this is the check that does not
depend on knowing them. Parameters in read-only memory (``sealed.py``) cannot
change: they are neither checksummed nor copied (only their identity is
checked). Version counters are not enough: ``param.data.zero_()`` and writes
through ``param.detach().numpy()`` leave ``param._version`` alone,
so the content itself is compared, bit for bit (NaN, -0.0 and bfloat16 too):
- CPU tensors: CRC-32 of the raw bytes (zlib, hardware-assisted: ~0.1 s for
  the 0.5 GB of a 135M-parameter float32 model on 2 cores; a position-weighted
  torch sum took 2.6 s). With ``keyed=True`` a BLAKE2b keyed with a secret
  drawn per guard instead (several times slower): CRC-32 is linear, so code that
  had already found an unguarded write path could forge a matching change;
  a keyed hash it cannot.
- Other devices: computed where the tensor lives (no copy to the host), the
  bytes as int64 words times a fixed pseudo-random weight per position,
  summed in wrapping int64 (exact and order-independent, so deterministic on
  any device; position-sensitive, so a swap of two elements shows). The
  weights are secret when ``keyed=True``.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import zlib
from dataclasses import dataclass

import torch

from ...envoy import Envoy, module_of
from .sealed import is_sealed

_CHUNK = 1 << 22
_MASK = (1 << 64) - 1
_weights: dict[tuple[str, int], torch.Tensor] = {}
_SLOTS = ("_modules", "_parameters", "_buffers")


def content_checksum(tensor: torch.Tensor, key: bytes | None = None) -> int | bytes:
    """A checksum of the bytes of ``tensor``, position-sensitive, keyed if ``key`` is given.

        a = torch.tensor([1.0, 2.0])
        assert content_checksum(a) != content_checksum(a.flip(0))
    """
    flat = tensor.detach()
    if not flat.is_contiguous():
        flat = flat.contiguous()
    flat = flat.reshape(-1).view(torch.uint8)
    if flat.numel() == 0:
        return 0
    if flat.device.type == "cpu":
        raw = (ctypes.c_ubyte * flat.numel()).from_address(flat.data_ptr())
        if key is None:
            return zlib.crc32(raw)
        return hashlib.blake2b(raw, key=key, digest_size=16).digest()
    return _device_checksum(flat, key)


def _device_checksum(flat: torch.Tensor, key: bytes | None) -> int:
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    try:
        words = flat.view(torch.int64)
    except RuntimeError:  # a view whose offset is not 8-byte aligned
        words = flat.clone().view(torch.int64)
    seed = int.from_bytes(hashlib.blake2b(key or b"glassbox", digest_size=8).digest(), "little") >> 1
    weights = _weights.get((str(flat.device), seed))
    if weights is None:
        generator = torch.Generator(device="cpu").manual_seed(seed)
        weights = torch.randint(-(2**62), 2**62, (_CHUNK,), generator=generator, dtype=torch.int64)
        weights = _weights[(str(flat.device), seed)] = weights.to(flat.device)
    total = 0
    for start in range(0, words.numel(), _CHUNK):
        chunk = words[start:start + _CHUNK]
        # A different multiplier per chunk keeps equal chunks in swapped places apart.
        total += int((chunk * weights[: chunk.numel()]).sum()) * (2 * start + 1)
    return total & _MASK


@dataclass
class _Entry:
    kind: str  # "param" or "buffer"
    tensor: torch.Tensor
    ptr: int
    dtype: torch.dtype
    shape: torch.Size
    device: torch.device
    requires_grad: bool


def _named_tensors(module: torch.nn.Module) -> dict[str, tuple[str, torch.Tensor]]:
    # remove_duplicate=False: a tied weight is watched under every name it has.
    out: dict[str, tuple[str, torch.Tensor]] = {}
    for name, tensor in module.named_parameters(remove_duplicate=False):
        out[name] = ("param", tensor)
    for name, tensor in module.named_buffers(remove_duplicate=False):
        if tensor is not None:
            out[name] = ("buffer", tensor)
    return out


class WeightGuard:
    """Snapshot a module's weights; report and undo any change.

        guard = WeightGuard(model)
        run_untrusted_job(model)
        changed = guard.restore()      # [] when the job left the weights alone
    """

    def __init__(self, module: torch.nn.Module, keep_copy: bool = True, keyed: bool = False) -> None:
        if not isinstance(module, torch.nn.Module):
            inner = module_of(module) if isinstance(module, Envoy) else None  # guard the module it wraps
            if not isinstance(inner, torch.nn.Module):
                raise TypeError(f"WeightGuard takes a torch.nn.Module, got {type(module).__name__}")
            module = inner
        self.module = module
        self._modules = dict(module.named_modules(remove_duplicate=False))
        self._layout = {name: tuple(list(getattr(m, slot).items()) for slot in _SLOTS)
                        for name, m in self._modules.items()}
        self._entries: dict[str, _Entry] = {}
        self._key = os.urandom(16) if keyed else None
        self._sums: dict[int, int | bytes] = {}
        self._pristine: dict[int, torch.Tensor] | None = {} if keep_copy else None
        # Offloaded weights (accelerate's device_map "disk" / offloaded "cpu"): the module holds a
        # meta placeholder that accelerate's hook swaps for the real tensor during each forward and
        # back after it. The values live in the hook's weights map (read-only memory-mapped files
        # for disk offload), not in the module, so they are not watched here (README: Security).
        self._offloaded = {name for name, (_, t) in _named_tensors(module).items() if t.device.type == "meta"}
        for name, (kind, tensor) in _named_tensors(module).items():
            if name in self._offloaded:
                continue
            self._entries[name] = _Entry(kind, tensor, tensor.data_ptr(), tensor.dtype, tensor.shape,
                                         tensor.device, tensor.requires_grad)
            key = id(tensor)
            if key not in self._sums:
                # Read-only memory (sealed.py) cannot change: no checksum, and it is its own copy.
                self._sums[key] = 0 if is_sealed(tensor) else content_checksum(tensor, self._key)
                if self._pristine is not None:
                    sealed = is_sealed(tensor)
                    self._pristine[key] = tensor if sealed else tensor.detach().to("cpu", copy=True)

    def verify(self) -> list[str]:
        """Names of parameters and buffers that differ from the snapshot in any way
        (content, dtype, shape, device, object, requires_grad), or that were added or removed."""
        current = _named_tensors(self.module)
        changed: list[str] = []
        sums: dict[int, int | bytes] = {}
        for name, entry in self._entries.items():
            found = current.get(name)
            if found is None or not self._same_object(entry, found[1]):
                changed.append(name)
                continue
            key = id(entry.tensor)
            if key not in sums:
                sums[key] = 0 if is_sealed(entry.tensor) else content_checksum(entry.tensor, self._key)
            if sums[key] != self._sums[key]:
                changed.append(name)
        changed.extend(name for name in current if name not in self._entries and name not in self._offloaded)
        return changed

    @staticmethod
    def _same_object(entry: _Entry, tensor: torch.Tensor) -> bool:
        return (
            tensor is entry.tensor
            and tensor.data_ptr() == entry.ptr
            and tensor.dtype == entry.dtype
            and tensor.shape == entry.shape
            and tensor.device == entry.device
            and tensor.requires_grad == entry.requires_grad
        )

    def restore(self) -> list[str]:
        """Undo every change ``verify`` reports and return those names. Needs the
        pristine copy (``keep_copy=True``)."""
        changed = self.verify()
        if not changed:
            return []
        if self._pristine is None:
            raise RuntimeError(f"weights changed ({', '.join(changed[:5])}) but no pristine copy was kept")
        self._restore_layout()
        done: set[int] = set()
        for name in changed:
            entry = self._entries.get(name)
            if entry is not None and id(entry.tensor) not in done:
                done.add(id(entry.tensor))
                self._restore_content(entry)
        return changed

    def _restore_layout(self) -> None:
        """Give every module back its original submodules, parameters and buffers, as
        the same objects and in the same order (a Sequential runs its children in order)."""
        for name, module in self._modules.items():
            for slot, items in zip(_SLOTS, self._layout[name]):
                current = getattr(module, slot)
                if [(k, id(v)) for k, v in current.items()] != [(k, id(v)) for k, v in items]:
                    current.clear()
                    current.update(items)
                    for key, _ in items:
                        module.__dict__.pop(key, None)  # a plain attribute would shadow the slot

    def _restore_content(self, entry: _Entry) -> None:
        tensor = entry.tensor
        assert self._pristine is not None
        pristine = self._pristine[id(tensor)]
        with torch.no_grad():
            if (tensor.data_ptr() == entry.ptr and tensor.dtype == entry.dtype
                    and tensor.shape == entry.shape and tensor.device == entry.device):
                tensor.copy_(pristine)  # in place: whatever holds this memory sees the fix
            else:
                tensor.data = pristine.to(entry.device, copy=True)
                for other in self._entries.values():  # tied names share the tensor
                    if other.tensor is tensor:
                        other.ptr = tensor.data_ptr()
        if tensor.requires_grad != entry.requires_grad:
            tensor.requires_grad_(entry.requires_grad)

    def clear_grads(self) -> None:
        """Set ``.grad`` of every parameter to None (a job's backward fills them)."""
        for entry in self._entries.values():
            if entry.kind == "param":
                entry.tensor.grad = None

    def __repr__(self) -> str:
        kept = "with" if self._pristine is not None else "without"
        name = type(self.module).__name__
        return f"WeightGuard({name}, {len(self._entries)} tensors, {kept} pristine copy)"

