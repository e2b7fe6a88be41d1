"""The wire format: exact round trips, clear refusals, version checks, limits, no pickle."""

from __future__ import annotations

import json
import math
import pickle

import numpy as np
import pytest
import torch

import glassbox
from glassbox.remote.protocol import (
    PROTOCOL_VERSION,
    ProtocolError,
    RemoteFunction,
    check_envelope,
    decode_values,
    encode_values,
    make_envelope,
)


def _round_trip(values: dict, **limits) -> dict:
    desc, blob = encode_values(values)
    desc = json.loads(json.dumps(desc, allow_nan=False))  # the description is plain JSON
    return decode_values(desc, blob, **limits)


def double(x):
    return x * 2


def helper_with_default(x, scale=1.5):
    """Docstrings travel too."""
    return x * scale


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", [
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8, torch.int16,
    torch.int32, torch.int64, torch.bool, torch.complex64, torch.complex128, torch.float8_e4m3fn,
])
def test_tensor_dtypes_round_trip_exactly(dtype):
    source = (torch.randn(3, 5) * 10).to(dtype) if not dtype.is_complex else torch.randn(3, 5, dtype=dtype)
    back = _round_trip({"t": source})["t"]
    assert back.dtype == dtype and back.shape == source.shape
    assert torch.equal(back.view(torch.uint8) if dtype.itemsize == 1 else back,
                       source.view(torch.uint8) if dtype.itemsize == 1 else source)


def test_special_floats_and_bits_survive_in_tensors():
    t = torch.tensor([math.nan, math.inf, -math.inf, -0.0, 1e-45], dtype=torch.float32)
    back = _round_trip({"t": t})["t"]
    assert torch.equal(back.view(torch.int32), t.view(torch.int32))  # bit for bit, NaN included


@pytest.mark.parametrize("shape", [(), (0,), (0, 3), (2, 0, 4), (1,), (2, 3, 4)])
def test_zero_d_and_empty_tensors(shape):
    t = torch.arange(math.prod(shape), dtype=torch.float32).reshape(shape)
    back = _round_trip({"t": t})["t"]
    assert back.shape == torch.Size(shape) and back.dtype == torch.float32 and torch.equal(back, t)


def test_views_and_non_contiguous_tensors_arrive_as_their_values():
    base = torch.arange(24.0).reshape(4, 6)
    values = {
        "base": base, "col": base[:, 2], "t": base.t(), "step": base[::2, 1::3], "exp": base[0:1].expand(3, 6)
    }
    back = _round_trip(values)
    for name, value in values.items():
        assert back[name].shape == value.shape and torch.equal(back[name], value), name
        assert back[name].is_contiguous()


def test_a_tensor_sent_twice_arrives_as_one_object():
    t = torch.ones(3)
    back = _round_trip({"a": t, "b": [t, t]})
    assert back["a"] is back["b"][0] is back["b"][1]
    assert len(encode_values({"a": t, "b": [t]})[0]["values"]["b"]["v"]) == 1


def test_gradients_and_parameters_arrive_as_plain_tensors():
    p = torch.nn.Parameter(torch.randn(2, 2))
    back = _round_trip({"p": p, "g": (p * 2).sum()})
    assert type(back["p"]) is torch.Tensor and not back["p"].requires_grad
    assert torch.equal(back["p"], p.detach())


def test_decoded_tensors_are_writable_and_independent_of_the_blob():
    desc, blob = encode_values({"t": torch.zeros(4)})
    back = decode_values(desc, blob)["t"]
    back += 1  # a server edits its inputs in place
    assert torch.equal(decode_values(desc, blob)["t"], torch.zeros(4))


def test_python_scalars_and_strings():
    values = {
        "none": None, "t": True, "f": False, "i": -7, "big": 2**100, "x": 0.1, "neg0": -0.0,
        "nan": math.nan, "inf": math.inf, "ninf": -math.inf, "s": "héllo \x00 ✓", "b": b"\x00\xffraw",
        "empty": "", "eb": b"",
    }
    back = _round_trip(values)
    for name, value in values.items():
        got = back[name]
        assert type(got) is type(value), name
        if isinstance(value, float) and math.isnan(value):
            assert math.isnan(got)
        else:
            assert got == value, name
    assert math.copysign(1, back["neg0"]) == -1


def test_nested_containers_keep_their_types_and_order():
    value = {"layers": [1, (2.5, "x", [None, {"deep": torch.tensor([1, 2])}])], "z": {}, "a": [], "t": ()}
    back = _round_trip({"v": value})["v"]
    assert list(back) == ["layers", "z", "a", "t"]
    assert back["layers"][0] == 1 and type(back["layers"][1]) is tuple
    assert type(back["layers"][1][2]) is list and back["layers"][1][2][0] is None
    assert torch.equal(back["layers"][1][2][1]["deep"], torch.tensor([1, 2]))
    assert back["z"] == {} and back["a"] == [] and back["t"] == ()


def test_slices_dtypes_sizes_and_devices():
    values = {
        "s": slice(None, -1, 2), "s2": slice(3), "all": slice(None), "dt": torch.bfloat16, "dt2": torch.int64,
        "size": torch.Size([2, 0, 3]), "dev": torch.device("cpu"), "cuda": torch.device("cuda", 1),
        "key": (slice(None), -1),
    }
    back = _round_trip(values)
    assert back == values
    assert type(back["size"]) is torch.Size and type(back["key"]) is tuple


def test_numpy_arrays_travel_as_tensors_and_come_back_as_numpy():
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::2]  # non-contiguous
    scalar = np.float64(2.5)
    back = _round_trip({"a": arr, "s": scalar, "b": np.array([True, False])})
    assert isinstance(back["a"], np.ndarray) and back["a"].dtype == np.float32
    assert np.array_equal(back["a"], arr)
    assert type(back["s"]) is np.float64 and back["s"] == 2.5
    assert back["b"].dtype == np.bool_
    desc, blob = encode_values({"a": arr})
    as_tensor = decode_values(desc, blob, numpy_as_tensor=True)["a"]  # what a torch-only server wants
    assert isinstance(as_tensor, torch.Tensor) and torch.equal(as_tensor, torch.from_numpy(arr.copy()))


def test_functions_travel_as_source_and_are_not_run():
    back = _round_trip({"f": double, "g": helper_with_default, "inner": [double]})
    assert back["f"] == RemoteFunction("double", "def double(x):\n    return x * 2\n")
    assert back["g"].name == "helper_with_default" and "Docstrings travel too" in back["g"].source
    assert back["inner"][0] is not double and isinstance(back["inner"][0], RemoteFunction)
    assert _round_trip({"f": back["f"]})["f"] == back["f"]  # a server can send one back


def test_model_outputs_come_back_as_their_class():
    from transformers.modeling_outputs import CausalLMOutput

    out = CausalLMOutput(logits=torch.randn(1, 2, 5))
    back = _round_trip({"out": out})["out"]
    assert type(back) is CausalLMOutput and torch.equal(back.logits, out.logits)


def test_glassbox_savable_tuples_arrive_as_tuples():
    from glassbox.envoy import SavableTuple

    back = _round_trip({"o": SavableTuple((torch.ones(1), None))})["o"]
    assert type(back) is tuple and back[1] is None


# ---------------------------------------------------------------- refusals


class Probe:
    pass


@pytest.mark.parametrize(("value", "type_name", "hint"), [
    (Probe(), "Probe", "convert it to a tensor or a list"),
    (torch.nn.Linear(2, 2), "Linear", "the model lives on the server"),
    (math, "module", "import it inside the trace"),
    (lambda x: x, "lambda", "define it with `def`"),
    (len, "builtin_function_or_method", "only plain functions defined with def"),
    (iter([1]), "list_iterator", "convert it to a tensor or a list"),
])
def test_unsupported_values_name_the_variable_and_say_what_to_do(value, type_name, hint):
    with pytest.raises(ProtocolError) as info:
        encode_values({"ok": 1, "culprit": {"inner": [0, value]}})
    message = str(info.value)
    assert "culprit['inner'][1]" in message and hint in message
    assert type_name in message


def test_functions_with_closures_are_refused():
    scale = 3

    def scaled(x):
        return x * scale

    with pytest.raises(ProtocolError, match=r"scaled\(\) uses variables of an enclosing function \(scale\)"):
        encode_values({"fn": scaled})


def test_functions_without_source_are_refused():
    namespace: dict = {}
    exec("def made_up(x):\n    return x\n", namespace)
    with pytest.raises(ProtocolError, match="source of function made_up"):
        encode_values({"fn": namespace["made_up"]})


def test_dicts_keep_int_and_tuple_keys_and_sets_travel():
    h = torch.randn(2, 3)
    value = {4: h, (2, "pos"): [1.5, {"x"}], None: frozenset({(1, 2)}), "nested": {0: {1: (h,)}}}
    back = _round_trip({"d": value})["d"]
    assert set(back) == {4, (2, "pos"), None, "nested"}
    assert torch.equal(back[4], h) and back[(2, "pos")] == [1.5, {"x"}]
    assert back[None] == frozenset({(1, 2)}) and type(back[None]) is frozenset
    assert back["nested"][0][1][0] is back[4]  # one tensor object, sent once
    desc, _ = encode_values({"d": {"a": 1}})
    assert desc["values"]["d"]["t"] == "dict"  # str-keyed dicts keep the original form


def test_a_tensors_grad_travels_with_it():
    leaf = torch.ones(3, requires_grad=True)
    hidden = leaf * 2
    hidden.retain_grad()
    (hidden ** 2).sum().backward()
    back = _round_trip({"h": hidden, "leaf": leaf, "plain": hidden.detach()})
    assert torch.equal(back["h"].grad, hidden.grad) and torch.equal(back["leaf"].grad, leaf.grad)
    assert back["plain"].grad is None


def test_unhashable_keys_are_refused_when_decoding():
    desc = {"values": {"d": {"t": "map", "v": [[{"t": "list", "v": []}, {"t": "none"}]]}}}
    with pytest.raises(ProtocolError, match="cannot be a key"):
        decode_values(desc, b"")


def test_cycles_are_refused():
    loop: list = []
    loop.append(loop)
    with pytest.raises(ProtocolError, match="contains itself"):
        encode_values({"loop": loop})


def test_unsupported_tensor_kinds():
    with pytest.raises(ProtocolError, match="to_dense"):
        encode_values({"s": torch.eye(2).to_sparse()})
    with pytest.raises(ProtocolError, match="meta tensor"):
        encode_values({"m": torch.empty(2, device="meta")})
    with pytest.raises(ProtocolError, match=r"dtype torch\.uint1 .*\.to\(torch\.float32\)"):
        encode_values({"u": torch.empty(0, dtype=torch.uint1)})


def test_names_must_be_strings():
    with pytest.raises(ProtocolError, match="names must be str"):
        encode_values({1: 2})  # type: ignore[dict-item]


# ---------------------------------------------------------------- hostile input


def test_a_pickle_blob_is_rejected_without_being_loaded():
    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('pickle ran')",))

    desc, _ = encode_values({"t": torch.ones(1)})
    with pytest.raises(ProtocolError, match="not valid safetensors"):
        decode_values(desc, pickle.dumps({"t": Boom()}))
    with pytest.raises(ProtocolError, match="not valid safetensors"):
        decode_values(desc, pickle.dumps(torch.ones(1)))


def test_garbage_blobs_are_rejected():
    desc, blob = encode_values({"t": torch.ones(4)})
    for bad in (b"\x00" * 7, blob[:-3], b"\xff" * 64, blob[:8] + b"{not json" + blob[17:]):
        with pytest.raises(ProtocolError):
            decode_values(desc, bad)


def test_description_and_blob_must_agree():
    desc, blob = encode_values({"t": torch.ones(2, 3)})
    lying = json.loads(json.dumps(desc))
    lying["values"]["t"]["shape"] = [3, 2]
    with pytest.raises(ProtocolError, match="described as float32"):
        decode_values(lying, blob)
    lying["values"]["t"]["key"] = "t9"
    with pytest.raises(ProtocolError, match="missing from the tensor blob"):
        decode_values(lying, blob)


@pytest.mark.parametrize("node", [
    {"t": "int", "v": "3"}, {"t": "float", "v": "1e3"}, {"t": "bool", "v": 1}, {"t": "bytes", "v": "!!"},
    {"t": "list", "v": {}}, {"t": "dict", "v": []}, {"t": "slice", "v": [{"t": "none"}]},
    {"t": "dtype", "v": "os.system"}, {"t": "size", "v": [1, "2"]},
    {"t": "function", "name": "a b", "source": ""},
    {"t": "pickle", "v": "gASV"}, {"v": 1}, "just a string", {"t": "tensor", "key": 3},
    {"t": "device", "v": "warp-drive:9"},
])
def test_malformed_descriptions_raise_protocol_errors(node):
    with pytest.raises(ProtocolError):
        decode_values({"values": {"x": node}}, b"")


def test_a_model_output_class_is_only_resolved_inside_transformers():
    node = {"t": "model_output", "cls": "subprocess.Popen", "v": {"args": {"t": "str", "v": "ls"}}}
    assert decode_values({"values": {"o": node}}, b"")["o"] == {"args": "ls"}  # a dict, nothing imported


# ---------------------------------------------------------------- limits


def test_blob_size_limit():
    desc, blob = encode_values({"t": torch.zeros(1000)})
    with pytest.raises(ProtocolError, match=r"4,\d+ bytes, over this side's limit of 1,000"):
        decode_values(desc, blob, max_bytes=1000)
    assert decode_values(desc, blob, max_bytes=len(blob))["t"].shape == (1000,)


def test_nesting_depth_limit():
    deep: list = []
    for _ in range(20):
        deep = [deep]
    desc, blob = encode_values({"d": deep})
    with pytest.raises(ProtocolError, match="deeper than the limit of 10"):
        decode_values(desc, blob, max_depth=10)
    with pytest.raises(ProtocolError, match="nested deeper than 10"):
        encode_values({"d": deep}, max_depth=10)


def test_element_count_limit():
    desc, blob = encode_values({"many": list(range(100))})
    with pytest.raises(ProtocolError, match="more than the limit of 50 values"):
        decode_values(desc, blob, max_elements=50)


# ---------------------------------------------------------------- envelope


def test_envelope_round_trip():
    env = make_envelope("request", {"source": "h = 1", "n": 2})
    assert env["protocol"] == PROTOCOL_VERSION and env["glassbox"] == glassbox.__version__
    assert env["kind"] == "request"
    assert check_envelope(json.loads(json.dumps(env)), "request") == {"source": "h = 1", "n": 2}


def test_envelope_rejects_reserved_keys_and_wrong_kind():
    with pytest.raises(ProtocolError, match="reserved"):
        make_envelope("request", {"protocol": 9})
    with pytest.raises(ProtocolError, match="expected a 'result' message, got 'request'"):
        check_envelope(make_envelope("request", {}), "result")


def test_newer_server_tells_the_client_to_upgrade():
    env = {**make_envelope("result", {}), "protocol": PROTOCOL_VERSION + 1, "glassbox": "9.0.0"}
    with pytest.raises(ProtocolError) as info:
        check_envelope(env, receiver="client")
    message = str(info.value)
    assert "server speaks glassbox protocol 2 (glassbox 9.0.0)" in message
    assert "upgrade the client with `pip install -U glassbox`" in message


def test_older_server_tells_the_client_to_upgrade_the_server():
    env = {**make_envelope("result", {}), "protocol": 0, "glassbox": "0.0.1"}
    with pytest.raises(ProtocolError, match=r"server is older: upgrade the server .*glassbox==0\.0\.1"):
        check_envelope(env, receiver="client")


def test_server_side_messages_name_the_right_side():
    newer = {**make_envelope("request", {}), "protocol": PROTOCOL_VERSION + 1}
    with pytest.raises(ProtocolError, match=r"The server is older: upgrade the server"):
        check_envelope(newer, receiver="server")
    older = {**make_envelope("request", {}), "protocol": 0}
    with pytest.raises(ProtocolError, match=r"client is older: upgrade the client with `pip install -U"):
        check_envelope(older, receiver="server")


@pytest.mark.parametrize("env", [[], {}, {"protocol": "1", "kind": "x"}, {"protocol": 1}])
def test_non_messages_are_rejected(env):
    with pytest.raises(ProtocolError):
        check_envelope(env)
