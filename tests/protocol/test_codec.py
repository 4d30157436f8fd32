import struct

import msgpack
import orjson
import pytest

from tokenchat.protocol import (
    JSON,
    MSGPACK,
    SUBPROTOCOLS,
    Codec,
    ErrorCode,
    JsonCodec,
    MsgpackCodec,
    ProtocolError,
    codec_for,
    json_to_msgpack,
)
from tokenchat.protocol.limits import CONTAINER_LEN_MAX

CODECS: list[Codec] = [JSON, MSGPACK]
EVENT = {"type": "tip", "room": "alice", "from": "bob", "amount": 5, "text": "é☃", "ts": 1}


def bad_request(codec: Codec, data: bytes | str) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        codec.decode(data)
    assert info.value.code is ErrorCode.BAD_REQUEST
    assert info.value.re is None
    return info.value


def test_subprotocols_and_frame_kinds() -> None:
    assert SUBPROTOCOLS == ("tokenchat.v1.json", "tokenchat.v1.msgpack")
    assert (JSON.subprotocol, JSON.binary) == ("tokenchat.v1.json", False)
    assert (MSGPACK.subprotocol, MSGPACK.binary) == ("tokenchat.v1.msgpack", True)
    assert isinstance(JSON, JsonCodec)
    assert isinstance(MSGPACK, MsgpackCodec)


def test_codec_for() -> None:
    assert codec_for(None) is JSON
    assert codec_for("tokenchat.v1.json") is JSON
    assert codec_for("tokenchat.v1.msgpack") is MSGPACK
    with pytest.raises(ValueError, match=r"tokenchat\.v2\.json"):
        codec_for("tokenchat.v2.json")


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.subprotocol)
def test_round_trip(codec: Codec) -> None:
    encoded = codec.encode(EVENT)
    assert isinstance(encoded, bytes)
    assert codec.decode(encoded) == EVENT


def test_json_encodes_utf8_text() -> None:
    assert JSON.encode({"t": "é"}) == '{"t":"é"}'.encode()


def test_json_decodes_text_and_binary_frames() -> None:
    assert JSON.decode('{"a": "é"}') == {"a": "é"}
    assert JSON.decode('{"a": "é"}'.encode()) == {"a": "é"}


def test_json_big_integer_is_not_an_int() -> None:
    # orjson reads integers past 64 bits as floats; commands then refuse them.
    assert isinstance(JSON.decode("123456789012345678901234567890"), float)


@pytest.mark.parametrize(
    "data",
    [
        "",
        "{",
        '{"a": 1} x',
        "NaN",
        '{"a": Infinity}',
        "1e999",
        '"\\ud800"',  # a lone surrogate
        "\ud800",
        b"\xff\xfe",  # not UTF-8
        "[" * 2000,  # deeper than orjson's 1024
    ],
)
def test_json_malformed(data: bytes | str) -> None:
    error = bad_request(JSON, data)
    assert error.message.startswith("malformed JSON")


def test_msgpack_refuses_text_frames() -> None:
    error = bad_request(MSGPACK, '{"type": "ping"}')
    assert "binary" in error.message


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"", "invalid msgpack"),
        (b"\x92\x01", "invalid msgpack"),  # truncated array
        (b"\xc1", "invalid msgpack"),  # the one never-used byte
        (msgpack.packb({"type": "ping"}) + b"\x00", "trailing"),
        (msgpack.packb(1) + msgpack.packb(2), "trailing"),
        (b"\xa2\xff\xfe", "invalid msgpack"),  # str that is not UTF-8
        (b"\x91" * 2000, "nested too deeply"),
        (msgpack.packb({1: "a"}), "invalid msgpack"),
        (msgpack.packb({(1, 2): "a"}), "invalid msgpack"),
        (msgpack.packb({b"type": "ping"}), "keys must be strings"),
        (msgpack.packb({"a": b"bytes"}), "bin"),
        (msgpack.packb([b""]), "bin"),
        (msgpack.packb(b"x"), "bin"),
        (msgpack.packb({"a": msgpack.ExtType(5, b"xy")}), "ext type 5"),
        (b"\xd4\xfe\x00", "ext type -2"),  # fixext 1, type -2 (reserved)
        (msgpack.packb({"a": msgpack.Timestamp(1, 2)}), "timestamp"),
        (msgpack.packb(msgpack.Timestamp(1, 2)), "timestamp"),
        (msgpack.packb({"a": float("nan")}), "NaN"),
        (msgpack.packb([float("inf")]), "NaN"),
        (msgpack.packb(float("-inf")), "NaN"),
    ],
)
def test_msgpack_malformed(data: bytes, words: str) -> None:
    assert words in bad_request(MSGPACK, data).message


@pytest.mark.parametrize("header", [b"\xdd", b"\xdf"])  # array32, map32
def test_msgpack_declared_length_beyond_frame(header: bytes) -> None:
    # A 5-byte frame claiming 4 billion elements must fail before allocating.
    error = bad_request(MSGPACK, header + b"\xff\xff\xff\xff")
    assert "exceeds" in error.message


def test_msgpack_container_cap() -> None:
    assert MSGPACK.decode(msgpack.packb([0] * CONTAINER_LEN_MAX)) == [0] * CONTAINER_LEN_MAX
    bad_request(MSGPACK, msgpack.packb([0] * (CONTAINER_LEN_MAX + 1)))
    many = {str(i): i for i in range(CONTAINER_LEN_MAX + 1)}
    bad_request(MSGPACK, msgpack.packb(many))


def test_msgpack_nested_headers_stay_bounded() -> None:
    # Every open container's slots are allocated up front; the cap keeps a
    # frame of ~1000 nested array32 headers to a few MiB and it still fails.
    data = (b"\xdd" + struct.pack(">I", CONTAINER_LEN_MAX)) * 1000
    bad_request(MSGPACK, data)


def test_msgpack_accepts_json_values() -> None:
    value = {"a": [None, True, 1, -(2**63), 2**64 - 1, 1.5, "é"], "b": {"c": {}}}
    assert MSGPACK.decode(msgpack.packb(value)) == value


def test_msgpack_encodes_str_as_str() -> None:
    assert msgpack.unpackb(MSGPACK.encode({"t": "é"}), raw=True) == {b"t": "é".encode()}


def test_json_to_msgpack() -> None:
    packed = json_to_msgpack(JSON.encode(EVENT))
    assert packed == MSGPACK.encode(EVENT)
    assert MSGPACK.decode(packed) == EVENT


def test_json_to_msgpack_keeps_nesting_and_numbers() -> None:
    event = {"type": "ok", "history": [{"amount": 2**63}, {"x": None, "y": 0.5}]}
    assert msgpack.unpackb(json_to_msgpack(orjson.dumps(event))) == event
