"""The link between a body process and its host: values round-trip exactly, and whatever a hostile
body writes into its end is refused as LinkClosed (the host then stops serving that body only)."""

from __future__ import annotations

import socket
import struct

import pytest
import torch

from glassbox.remote.framing import frame
from glassbox.server.jobs.split_link import MAX_FRAME, NOTHING, Link, LinkClosed


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    yield Link(a), Link(b), a
    a.close()
    b.close()


@pytest.mark.parametrize("value", [
    torch.randn(1, 7, 16), torch.randn(3, 4).bfloat16().t(), torch.zeros(0, 3), torch.tensor(5),
    torch.ones(2, dtype=torch.bool), torch.arange(6, dtype=torch.int64).view(2, 3)[:, 1:],
])
def test_a_tensor_arrives_exactly(pair, value):
    sender, receiver, _ = pair
    sender.send({"op": "value"}, value)
    message, got = receiver.receive()
    assert message == {"op": "value"}
    assert got.dtype == value.dtype and got.shape == value.shape and torch.equal(got, value)
    got.add_(1) if got.dtype != torch.bool else got.logical_not_()  # its own memory: writable


def test_containers_and_no_value(pair):
    sender, receiver, _ = pair
    value = (torch.ones(2), {"mask": torch.zeros(1, 2, dtype=torch.int64), "n": 3})
    sender.send({"op": "value"}, value)
    _, got = receiver.receive()
    assert torch.equal(got[0], value[0]) and torch.equal(got[1]["mask"], value[1]["mask"])
    assert got[1]["n"] == 3
    sender.send({"op": "done"})
    assert receiver.receive() == ({"op": "done"}, NOTHING)


def _raw(sock: socket.socket, data: bytes) -> None:
    sock.sendall(struct.pack("<Q", len(data)) + data)


@pytest.mark.parametrize("bad", [
    lambda: frame({"op": "value", "tensor": ["float32", [2, 2]]}, b"\0" * 15),     # bytes short of the shape
    lambda: frame({"op": "value", "tensor": ["object", [1]]}, b"\0" * 8),        # not a dtype of the list
    lambda: frame({"op": "value", "tensor": ["float32", [-1]]}, b""),           # a negative size
    lambda: frame({"op": "value", "desc": {"values": {"v": {"t": "tensor", "key": "x"}}}}, b"junk"),
    lambda: frame({"no": "op"}),
    lambda: b"\xff" * 40,                                                          # not a frame at all
])
def test_what_a_hostile_body_writes_is_refused(pair, bad):
    _, receiver, sender_socket = pair
    _raw(sender_socket, bad())
    with pytest.raises(LinkClosed):
        receiver.receive()


def test_an_oversized_frame_and_a_closed_end_are_refused(pair):
    _, receiver, sender_socket = pair
    sender_socket.sendall(struct.pack("<Q", MAX_FRAME + 1))
    with pytest.raises(LinkClosed, match="limit"):
        receiver.receive()
    sender_socket.close()
    with pytest.raises(LinkClosed):
        receiver.receive()


def test_a_receiver_refuses_a_frame_over_its_limit_before_reading_it(pair):
    sender, receiver, _ = pair
    sent = sender.send({"op": "value"}, torch.ones(1000))
    assert sent > 4000
    with pytest.raises(LinkClosed, match="limit of 1,000"):
        receiver.receive(limit=1000)
