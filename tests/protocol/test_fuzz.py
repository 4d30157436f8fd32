"""Property tests: whatever a client sends, decoding yields a command or a
ProtocolError, never any other exception; valid commands survive both codecs."""

from typing import Any

import msgpack
import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenchat.protocol import (
    COMMANDS,
    JSON,
    MSGPACK,
    Balance,
    Codec,
    Command,
    Dm,
    ErrorCode,
    Hello,
    Join,
    Leave,
    Ping,
    ProtocolError,
    Say,
    Tip,
    command_to_dict,
    decode_command,
    parse_command,
)
from tokenchat.protocol.limits import (
    AMOUNT_MAX,
    AMOUNT_MIN,
    DM_TEXT_LEN_MAX,
    ID_INT_MAX,
    ID_INT_MIN,
    ID_STR_LEN_MAX,
    KEY_LEN_MAX,
    SAY_TEXT_LEN_MAX,
    TIP_TEXT_LEN_MAX,
)

CODECS: tuple[Codec, ...] = (JSON, MSGPACK)
FUZZ = settings(max_examples=300, deadline=None)

# Integers both encoders can write: orjson and msgpack stop at 64 bits.
ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)
scalars = st.none() | st.booleans() | ints | st.floats() | st.text(max_size=80)


def json_like(leaves: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.recursive(
        leaves,
        lambda children: (
            st.lists(children, max_size=6)
            | st.dictionaries(st.text(max_size=12), children, max_size=6)
        ),
        max_leaves=30,
    )


# Anything orjson or msgpack can write, NaN and Infinity included.
json_values = json_like(scalars)
# What JSON itself can express: the values both codecs must pass through.
strict_json_values = json_like(
    st.none()
    | st.booleans()
    | ints
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=80)
)

# Values near each field's rules: valid ones, off by one, wrong types.
edge_ints = st.sampled_from(
    [0, 1, -1, AMOUNT_MAX, AMOUNT_MAX + 1, ID_INT_MAX, ID_INT_MAX + 1, ID_INT_MIN, 2**64 - 1]
)
edge_texts = st.sampled_from(["", "alice", "alice\n", "1-0", "x" * 65, "é" * 2049, "1-2-3"])
field_values = edge_ints | edge_texts | json_values
command_names = st.sampled_from([*COMMANDS, "", "PING", "welcome", "ok", "hello "])
command_like = st.fixed_dictionaries(
    {"type": command_names | scalars},
    optional={
        name: field_values
        for name in [
            "id",
            "token",
            "room",
            "since",
            "text",
            "amount",
            "key",
            "to",
            "max_price",
            "extra",
        ]
    },
)


def check_decodes_or_rejects(codec: Codec, data: bytes | str) -> None:
    try:
        cmd = decode_command(codec, data)
    except ProtocolError as exc:
        assert exc.code in (ErrorCode.BAD_REQUEST, ErrorCode.UNKNOWN_COMMAND)
        assert exc.re is None or isinstance(exc.re, int | str)
    else:
        assert type(cmd) in COMMANDS.values()


@FUZZ
@given(st.binary(max_size=300))
def test_arbitrary_bytes(data: bytes) -> None:
    for codec in CODECS:
        check_decodes_or_rejects(codec, data)


@FUZZ
@given(st.text(max_size=300))
def test_arbitrary_text_frames(data: str) -> None:
    for codec in CODECS:
        check_decodes_or_rejects(codec, data)


def encodings(value: object) -> list[tuple[Codec, bytes]]:
    # orjson writes NaN and Infinity as null; msgpack keeps them (and the
    # codec then refuses them).
    return [(JSON, orjson.dumps(value)), (MSGPACK, msgpack.packb(value))]


@FUZZ
@given(json_values)
def test_arbitrary_json_values(value: Any) -> None:
    for codec, data in encodings(value):
        check_decodes_or_rejects(codec, data)


@FUZZ
@given(command_like)
def test_command_like_objects(obj: dict[str, Any]) -> None:
    for codec, data in encodings(obj):
        check_decodes_or_rejects(codec, data)
    # The error carries the id exactly when the id itself was valid.
    try:
        parse_command(obj)
    except ProtocolError as exc:
        if exc.re is not None:
            assert exc.re == obj["id"]
            assert type(exc.re) is type(obj["id"])


@FUZZ
@given(command_like, st.binary(min_size=1, max_size=8))
def test_truncated_and_extended_msgpack(obj: dict[str, Any], junk: bytes) -> None:
    data = msgpack.packb(obj)
    check_decodes_or_rejects(MSGPACK, data[: len(data) // 2])
    check_decodes_or_rejects(MSGPACK, data + junk)


# Strategies of valid commands, field by field.
user_ids = st.text(alphabet="ABCXYZabcxyz0189_.:-", min_size=1, max_size=64)
command_ids = (
    st.none()
    | st.integers(min_value=ID_INT_MIN, max_value=ID_INT_MAX)
    | st.text(min_size=1, max_size=ID_STR_LEN_MAX)
)
amounts = st.integers(min_value=AMOUNT_MIN, max_value=AMOUNT_MAX)
# Idempotency keys are printable ASCII (limits.PRINTABLE_ASCII_RE).
keys = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=KEY_LEN_MAX
)
offsets = st.builds(
    "{}-{}".format,
    st.integers(min_value=0, max_value=2**64 - 1),
    st.integers(min_value=0, max_value=2**64 - 1),
)
tokens = st.text(min_size=1, max_size=300)

valid_commands: st.SearchStrategy[Command] = st.one_of(
    st.builds(Hello, command_ids, tokens),
    st.builds(Join, command_ids, user_ids, st.none() | offsets),
    st.builds(Leave, command_ids, user_ids),
    st.builds(Say, command_ids, user_ids, st.text(min_size=1, max_size=SAY_TEXT_LEN_MAX)),
    st.builds(Tip, command_ids, user_ids, amounts, keys, st.text(max_size=TIP_TEXT_LEN_MAX)),
    st.builds(
        Dm,
        command_ids,
        user_ids,
        st.text(min_size=1, max_size=DM_TEXT_LEN_MAX),
        keys,
        st.none() | st.integers(min_value=0, max_value=AMOUNT_MAX),
    ),
    st.builds(Balance, command_ids),
    st.builds(Ping, command_ids),
)


@FUZZ
@given(valid_commands, st.dictionaries(st.sampled_from(["extra", "v2", "z"]), strict_json_values))
def test_round_trip(cmd: Command, extra: dict[str, Any]) -> None:
    wire = {**extra, **command_to_dict(cmd)}
    for codec in CODECS:
        assert decode_command(codec, codec.encode(wire)) == cmd
