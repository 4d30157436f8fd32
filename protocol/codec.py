"""Codecs: one frame's bytes to a decoded value and back, per subprotocol.

Both codecs decode to the same values, JSON's: None, bool, int, float
(finite), str, list, and dict with str keys. Anything else a msgpack frame can
express (bin, ext types, timestamps, non-str map keys, NaN) is rejected, so the
layers above see one data model whichever subprotocol a client chose
("field names and values are the same in both", DESIGN.md section 3).

``decode`` raises ``ProtocolError(BAD_REQUEST)`` on any malformed input and
nothing else; ``encode`` takes what the server built, and an error there is a
bug (it raises the encoder's own TypeError).
"""

import math
from collections.abc import Mapping
from typing import Any, Final, Protocol

import msgpack
import orjson

from .errors import ErrorCode, ProtocolError
from .limits import CONTAINER_LEN_MAX

JSON_SUBPROTOCOL: Final = "tokenchat.v1.json"
MSGPACK_SUBPROTOCOL: Final = "tokenchat.v1.msgpack"

# The decoder's own message is helpful to a client author, but it is still
# bounded: an error reply should never be large.
_DETAIL_LEN_MAX: Final = 200  # characters


class Codec(Protocol):
    subprotocol: str  # the Sec-WebSocket-Protocol value
    binary: bool  # True: frames are sent as binary frames, else as text frames

    def decode(self, data: bytes | str) -> object:
        """The value in one frame; ``ProtocolError(BAD_REQUEST)`` if malformed."""
        ...

    def encode(self, obj: Mapping[str, Any]) -> bytes:
        """One frame's payload for ``obj`` (UTF-8 text for JSON)."""
        ...


def _malformed(what: str, exc: BaseException | None = None) -> ProtocolError:
    detail = str(exc) if exc is not None else ""
    if len(detail) > _DETAIL_LEN_MAX:
        detail = detail[:_DETAIL_LEN_MAX] + "..."
    message = f"{what}: {detail}" if detail else what
    return ProtocolError(ErrorCode.BAD_REQUEST, message)


class JsonCodec:
    """``tokenchat.v1.json``: one JSON object per text frame.

    Binary frames are accepted too (as UTF-8), since the JSON is the same.
    orjson rejects invalid UTF-8, lone surrogates, NaN and Infinity, and
    nesting deeper than 1024; it allocates as it reads, so a frame's memory is
    proportional to its size.
    """

    subprotocol: str = JSON_SUBPROTOCOL
    binary: bool = False

    def decode(self, data: bytes | str) -> object:
        try:
            value: object = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise _malformed("malformed JSON", exc) from None
        return value

    def encode(self, obj: Mapping[str, Any]) -> bytes:
        return orjson.dumps(obj)

    def __repr__(self) -> str:
        return "JsonCodec()"


class MsgpackCodec:
    """``tokenchat.v1.msgpack``: one msgpack map per binary frame.

    The unpacker's limits are set from the frame's own length (nothing in a
    frame of n bytes can legitimately be longer than n) and containers are
    capped at ``CONTAINER_LEN_MAX`` elements, because msgpack allocates a
    container's slots when it reads the header: without the cap a 64 KiB
    frame of nested headers could make it allocate hundreds of MiB.
    """

    subprotocol: str = MSGPACK_SUBPROTOCOL
    binary: bool = True

    def decode(self, data: bytes | str) -> object:
        if isinstance(data, str):
            raise _malformed("the msgpack subprotocol takes binary frames, not text frames")
        frame_len = len(data)
        container_len_max = min(frame_len, CONTAINER_LEN_MAX)
        try:
            value: object = msgpack.unpackb(
                data,
                raw=False,  # str is UTF-8 text, invalid UTF-8 raises
                strict_map_key=True,  # only str (or bin, rejected below) keys
                use_list=True,
                ext_hook=_reject_ext,
                object_hook=_check_map,
                list_hook=_check_array,
                max_str_len=frame_len,
                max_bin_len=frame_len,
                max_ext_len=frame_len,
                max_array_len=container_len_max,
                max_map_len=container_len_max,
            )
        except msgpack.ExtraData:
            raise _malformed("trailing bytes after the msgpack object") from None
        except msgpack.StackError:
            raise _malformed("msgpack objects nested too deeply") from None
        except msgpack.FormatError:
            raise _malformed("invalid msgpack data") from None
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            # ValueError: truncated data, a limit exceeded, invalid UTF-8 or a
            # non-str key; UnpackException: the other unpacker failures.
            raise _malformed("invalid msgpack data", exc) from None
        # The hooks only see containers; a bare scalar frame is checked here.
        _check_scalar(value)
        return value

    def encode(self, obj: Mapping[str, Any]) -> bytes:
        packed: bytes = msgpack.packb(obj, use_bin_type=True)
        return packed

    def __repr__(self) -> str:
        return "MsgpackCodec()"


def _reject_ext(code: int, data: bytes) -> object:
    # Called for every ext type except -1 (timestamps), which _check_scalar
    # rejects as a decoded msgpack.Timestamp.
    raise ProtocolError(ErrorCode.BAD_REQUEST, f"msgpack ext type {code} is not allowed")


def _check_scalar(value: object) -> None:
    if isinstance(value, bytes | bytearray):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "msgpack bin values are not allowed")
    if isinstance(value, msgpack.Timestamp):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "msgpack timestamps are not allowed")
    if isinstance(value, float) and not math.isfinite(value):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "NaN and Infinity are not allowed")


def _check_map(value: dict[object, object]) -> dict[object, object]:
    for key, item in value.items():
        if not isinstance(key, str):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "msgpack map keys must be strings")
        _check_scalar(item)
    return value


def _check_array(value: list[object]) -> list[object]:
    for item in value:
        _check_scalar(item)
    return value


JSON: Final = JsonCodec()
MSGPACK: Final = MsgpackCodec()
SUBPROTOCOLS: Final[tuple[str, ...]] = (JSON_SUBPROTOCOL, MSGPACK_SUBPROTOCOL)

_BY_SUBPROTOCOL: Final[Mapping[str, Codec]] = {
    JSON_SUBPROTOCOL: JSON,
    MSGPACK_SUBPROTOCOL: MSGPACK,
}


def codec_for(subprotocol: str | None) -> Codec:
    """The codec of a negotiated subprotocol; JSON when the client offered none."""
    if subprotocol is None:
        return JSON
    try:
        return _BY_SUBPROTOCOL[subprotocol]
    except KeyError:
        raise ValueError(f"unknown subprotocol {subprotocol!r}") from None


def json_to_msgpack(json_bytes: bytes) -> bytes:
    """Re-encode one JSON-encoded event for msgpack members, so a broadcast
    is encoded once per codec, not once per member.

    Events never carry integers beyond 64 bits, which msgpack cannot pack.
    """
    packed: bytes = msgpack.packb(orjson.loads(json_bytes), use_bin_type=True)
    return packed
