from typing import Any

import msgpack
import orjson
import pytest

from tokenchat.protocol import (
    COMMANDS,
    JSON,
    MSGPACK,
    Balance,
    Ban,
    Codec,
    Command,
    Dm,
    ErrorCode,
    Hello,
    Join,
    Leave,
    Mute,
    Ping,
    PostMedia,
    ProtocolError,
    Say,
    Slow,
    Tip,
    Unlock,
    command_to_dict,
    decode_command,
    parse_command,
)
from tokenchat.protocol.limits import RESTRICTION_S_MAX, SLOW_S_MAX

CODECS: list[Codec] = [JSON, MSGPACK]

VALID: list[tuple[dict[str, Any], Command]] = [
    ({"type": "hello", "id": 1, "token": "a.b.c"}, Hello(1, "a.b.c")),
    ({"type": "join", "id": 2, "room": "alice"}, Join(2, "alice", None)),
    (
        {"type": "join", "room": "alice", "since": "1712345678901-0"},
        Join(None, "alice", "1712345678901-0"),
    ),
    ({"type": "leave", "id": "x", "room": "a_b.c:d-e"}, Leave("x", "a_b.c:d-e")),
    ({"type": "say", "id": 3, "room": "alice", "text": "hi é☃"}, Say(3, "alice", "hi é☃")),
    (
        {"type": "tip", "id": 4, "room": "alice", "amount": 5, "key": "k1"},
        Tip(4, "alice", 5, "k1", ""),
    ),
    (
        {"type": "tip", "id": 5, "room": "alice", "amount": 1_000_000, "key": "k", "text": "yay"},
        Tip(5, "alice", 1_000_000, "k", "yay"),
    ),
    (
        {"type": "tip", "room": "alice", "item": "i_0123456789abcdef", "key": "k"},
        Tip(None, "alice", None, "k", "", item="i_0123456789abcdef"),
    ),
    (
        {"type": "tip", "room": "alice", "item": "i_1", "key": "k", "max_price": 0, "text": "x"},
        Tip(None, "alice", None, "k", "x", item="i_1", max_price=0),
    ),
    (
        {"type": "dm", "id": 6, "to": "alice", "text": "hey", "key": "k2"},
        Dm(6, "alice", "hey", "k2", None),
    ),
    (
        {"type": "dm", "to": "alice", "text": "hey", "key": "k2", "max_price": 0},
        Dm(None, "alice", "hey", "k2", 0),
    ),
    ({"type": "balance", "id": 7}, Balance(7)),
    ({"type": "ping"}, Ping(None)),
]


def rejected(obj: object) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        parse_command(obj)
    return info.value


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.subprotocol)
@pytest.mark.parametrize(("wire", "expected"), VALID, ids=lambda v: str(v)[:40])
def test_valid_commands(codec: Codec, wire: dict[str, Any], expected: Command) -> None:
    assert decode_command(codec, codec.encode(wire)) == expected


def test_json_text_frame() -> None:
    assert decode_command(JSON, '{"type": "ping", "id": 9}') == Ping(9)


def test_msgpack_text_frame_is_bad_request() -> None:
    with pytest.raises(ProtocolError) as info:
        decode_command(MSGPACK, '{"type": "ping", "id": 9}')
    assert info.value.code is ErrorCode.BAD_REQUEST


# Custom requests (docs/protocol.md, "Custom requests").
REQUEST_COMMANDS = {
    "request_offer",
    "request_accept",
    "request_deliver",
    "request_decline",
    "request_cancel",
    "request_list",
}


# Private shows (docs/protocol.md, "Private shows").
PRIVATE_COMMANDS = {"private_request", "private_accept", "private_decline", "private_end"}


def test_private_commands_parse() -> None:
    from tokenchat.protocol import PrivateAccept, PrivateEnd, PrivateRequest

    show = "p_" + "ab" * 12
    assert parse_command(
        {"type": "private_request", "id": 1, "model": "alice", "rate": 60, "key": "k"}
    ) == PrivateRequest(1, "alice", 60, "k")
    assert parse_command({"type": "private_accept", "show": show}) == PrivateAccept(None, show)
    assert parse_command({"type": "private_end", "id": "x", "show": show}) == PrivateEnd("x", show)
    for bad in ({"rate": 0}, {"rate": 1_000_001}, {"key": ""}, {"model": "a b"}):
        fields = {"type": "private_request", "model": "alice", "rate": 60, "key": "k", **bad}
        assert rejected(fields).code is ErrorCode.BAD_REQUEST


# Ticket shows (server/economy/shows.py).
SHOW_COMMANDS = {"buy_ticket", "show_start", "show_end", "show_cancel"}
# Moderation (docs/protocol.md, "Moderation").
MODERATION_COMMANDS = {"mute", "unmute", "kick", "ban", "unban", "clear", "slow"}


def test_registry() -> None:
    assert (
        set(COMMANDS)
        == {
            "hello",
            "join",
            "history",
            "leave",
            "say",
            "tip",
            "dm",
            "balance",
            "ping",
            "post_media",
            "unlock",
        }
        | REQUEST_COMMANDS
        | PRIVATE_COMMANDS
        | SHOW_COMMANDS
        | MODERATION_COMMANDS
    )
    for name, cls in COMMANDS.items():
        assert name == cls.TYPE


def test_history_command_needs_a_room_and_an_offset() -> None:
    from tokenchat.protocol import RoomHistory

    parsed = parse_command({"type": "history", "id": 3, "room": "alice", "since": "5-0"})
    assert parsed == RoomHistory(3, "alice", "5-0")
    for bad in ({"since": None}, {"since": "5"}, {"since": "1-2-3"}, {"room": "a b"}):
        fields = {"type": "history", "room": "alice", "since": "5-0", **bad}
        assert rejected(fields).code is ErrorCode.BAD_REQUEST


def test_media_commands() -> None:
    unlock = parse_command({"type": "unlock", "media": "m_abc-_9", "key": "k", "max_price": 5})
    assert unlock == Unlock(None, "m_abc-_9", "k", 5)
    # Any kind of id passes the wire (the server answers NOT_FOUND for a wrong kind).
    assert parse_command({"type": "unlock", "media": "t_x", "key": "k"}) == Unlock(None, "t_x", "k")
    post = parse_command({"type": "post_media", "room": "alice", "media": "m_a"})
    assert post == PostMedia(None, "alice", "m_a", "")
    dm = parse_command({"type": "dm", "to": "bob", "text": "t", "key": "k", "media": "m_a"})
    assert dm == Dm(None, "bob", "t", "k", None, "m_a")
    for bad in ("", "m/a", "m_" + "a" * 63, "m a", 5, ["m_a"]):
        for wire in (
            {"type": "unlock", "media": bad, "key": "k"},
            {"type": "post_media", "room": "alice", "media": bad},
            {"type": "dm", "to": "bob", "text": "t", "key": "k", "media": bad},
        ):
            error = rejected(wire)
            assert error.code is ErrorCode.BAD_REQUEST and "'media'" in error.message, wire
    too_long = {"type": "post_media", "room": "alice", "media": "m_a", "text": "x" * 1001}
    assert "'text'" in rejected(too_long).message


def test_commands_are_frozen_and_slotted() -> None:
    tip = Tip(1, "alice", 5, "k")
    assert tip.text == ""
    assert not hasattr(tip, "__dict__")
    with pytest.raises(AttributeError):
        tip.amount = 6  # type: ignore[misc]


def test_extra_fields_are_ignored() -> None:
    wire = {"type": "say", "id": 1, "room": "a", "text": "t", "future": {"x": [1]}, "more": None}
    assert parse_command(wire) == Say(1, "a", "t")


def test_optional_fields_may_be_null() -> None:
    assert parse_command({"type": "join", "room": "a", "since": None}) == Join(None, "a")
    assert parse_command(
        {"type": "dm", "to": "a", "text": "t", "key": "k", "max_price": None}
    ) == Dm(None, "a", "t", "k")
    assert parse_command(
        {"type": "tip", "room": "a", "amount": 1, "key": "k", "text": None}
    ) == Tip(None, "a", 1, "k", "")


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({}, "field 'amount' (or 'item', a menu item) is required"),
        ({"amount": None, "item": None}, "is required"),
        ({"amount": 5, "item": "i_1"}, "not both"),
        ({"amount": 5, "max_price": 5}, "'max_price' goes with 'item'"),
        ({"item": "i 1"}, "field 'item' must be a menu item id"),
        ({"item": ""}, "field 'item' must be"),
        ({"item": "i_" + "0" * 63}, "field 'item' must be"),
        ({"item": ["i_1"]}, "field 'item' must be"),
        ({"item": "i_1", "max_price": -1}, "field 'max_price' must be"),
        ({"item": "i_1", "max_price": 1_000_001}, "field 'max_price' must be"),
    ],
)
def test_a_tip_names_an_amount_or_an_item(fields: dict[str, Any], words: str) -> None:
    error = rejected({"type": "tip", "id": 8, "room": "a", "key": "k", **fields})
    assert error.code is ErrorCode.BAD_REQUEST and error.re == 8
    assert words in error.message


def test_menu_labels_are_one_printable_line() -> None:
    from tokenchat.protocol.commands import MENU_LABEL

    for good in ("Dance", "x" * 40, "Song 🎵", "é ☃ 中文", " a "):
        assert MENU_LABEL.accept(good), good
    for bad in ("", " ", "x" * 41, "a\nb", "a\tb", "nul\x00", "rtl\u202e", "zw\u200b", 5, None):
        assert not MENU_LABEL.accept(bad), bad


@pytest.mark.parametrize("command_id", [None, 0, -1, 2**63 - 1, -(2**63), "a", "x" * 64, "é", " "])
def test_valid_ids(command_id: int | str | None) -> None:
    wire: dict[str, Any] = {"type": "ping"}
    if command_id is not None:
        wire["id"] = command_id
    for codec in CODECS:
        assert decode_command(codec, codec.encode(wire)) == Ping(command_id)


@pytest.mark.parametrize(
    "command_id", [True, False, 1.0, 1.5, 2**63, -(2**63) - 1, 2**64 - 1, "", "x" * 65, [], {}]
)
def test_invalid_ids(command_id: object) -> None:
    error = rejected({"type": "ping", "id": command_id})
    assert error.code is ErrorCode.BAD_REQUEST
    assert "'id'" in error.message
    assert error.re is None  # an id that cannot be read cannot be echoed


@pytest.mark.parametrize("obj", [None, [], ["ping"], "ping", 1, 1.5, True])
def test_not_an_object(obj: object) -> None:
    error = rejected(obj)
    assert error.code is ErrorCode.BAD_REQUEST
    assert "object" in error.message
    assert error.re is None


@pytest.mark.parametrize("type_value", [None, 1, True, ["ping"], {"a": 1}])
def test_type_missing_or_not_a_string(type_value: object) -> None:
    wire: dict[str, Any] = {"id": "c1"}
    if type_value is not None:
        wire["type"] = type_value
    error = rejected(wire)
    assert error.code is ErrorCode.BAD_REQUEST
    assert "'type'" in error.message
    assert error.re == "c1"


@pytest.mark.parametrize("name", ["x", "", "PING", "Ping", "welcome", "ok", "ping "])
def test_unknown_command(name: str) -> None:
    error = rejected({"type": name, "id": 42})
    assert error.code is ErrorCode.UNKNOWN_COMMAND
    assert error.message == f"unknown command {name!r}"
    assert error.re == 42


def test_unknown_command_name_is_quoted_short() -> None:
    error = rejected({"type": "z" * 10_000})
    assert error.code is ErrorCode.UNKNOWN_COMMAND
    assert len(error.message) < 100
    assert error.re is None


def test_unknown_command_example_message() -> None:
    assert rejected({"type": "x"}).message == "unknown command 'x'"


BASE: dict[str, dict[str, Any]] = {
    "hello": {"token": "a.b.c"},
    "join": {"room": "alice", "since": "1-0"},
    "leave": {"room": "alice"},
    "say": {"room": "alice", "text": "hi"},
    "tip": {"room": "alice", "amount": 5, "key": "k", "text": "t"},
    "dm": {"to": "alice", "text": "hi", "key": "k", "max_price": 10},
}

REQUIRED = [
    ("hello", "token"),
    ("join", "room"),
    ("leave", "room"),
    ("say", "room"),
    ("say", "text"),
    ("tip", "room"),
    ("tip", "amount"),
    ("tip", "key"),
    ("dm", "to"),
    ("dm", "text"),
    ("dm", "key"),
]

BAD_USER_IDS: list[object] = [
    "",
    "a" * 65,
    "al ice",
    "alice\n",  # `$` would let this through; the contract's regex must not
    "\nalice",
    "al/ice",
    "ålice",
    "alice\x00",
    5,
    True,
    ["alice"],
    {"id": "alice"},
]
BAD_TEXTS_1000: list[object] = ["", "x" * 1001, 1, True, ["hi"], {"t": "hi"}]
# Keys reach Postgres text and jsonb: NUL (refused by both), other control
# characters, DEL, non-ASCII letters and a lone surrogate are refused at the door.
NOT_PRINTABLE_KEYS: list[object] = ["k\x00x", "\x00", "k\n", "k\t", "k\x7f", "kä", "k\ud800"]

INVALID: list[tuple[str, str, object]] = [
    ("hello", "token", ""),
    ("hello", "token", "x" * 4097),
    ("hello", "token", "é" * 2049),  # 4098 bytes in 2049 characters
    ("hello", "token", 5),
    ("hello", "token", ["a.b.c"]),
    *[("join", "room", v) for v in BAD_USER_IDS],
    *[
        ("join", "since", v)
        for v in [
            *["", "1", "1-", "-1", "a-b", "1-2-3", "1-2\n", "1" * 21 + "-0"],
            *[f"{2**64}-0", f"0-{2**64}", 0, 1.5, True],
        ]
    ],
    *[("leave", "room", v) for v in BAD_USER_IDS],
    *[("say", "room", v) for v in BAD_USER_IDS],
    *[("say", "text", v) for v in BAD_TEXTS_1000],
    *[("tip", "room", v) for v in BAD_USER_IDS],
    *[
        ("tip", "amount", v)
        for v in [0, -1, 1_000_001, 2**64, True, False, 1.0, 5.5, "5", [5], {"n": 5}]
    ],
    *[("tip", "key", v) for v in ["", "k" * 65, 1, True, ["k"], *NOT_PRINTABLE_KEYS]],
    *[("tip", "text", v) for v in ["x" * 256, 0, True, ["t"]]],
    *[("dm", "to", v) for v in BAD_USER_IDS],
    *[("dm", "text", v) for v in BAD_TEXTS_1000],
    *[("dm", "key", v) for v in ["", "k" * 65, 7, False, *NOT_PRINTABLE_KEYS]],
    *[("dm", "max_price", v) for v in [-1, 1_000_001, True, 1.0, "10", [10]]],
]


@pytest.mark.parametrize(("name", "field"), REQUIRED)
@pytest.mark.parametrize("command_id", [7, "c-7", None])
def test_missing_field(name: str, field: str, command_id: int | str | None) -> None:
    wire = {"type": name, **BASE[name]}
    if command_id is not None:
        wire["id"] = command_id
    del wire[field]
    error = rejected(wire)
    assert error.code is ErrorCode.BAD_REQUEST
    assert f"'{field}'" in error.message
    assert "required" in error.message
    assert error.re == command_id


@pytest.mark.parametrize(("name", "field"), REQUIRED)
def test_required_field_null(name: str, field: str) -> None:
    error = rejected({"type": name, "id": 1, **BASE[name], field: None})
    assert error.code is ErrorCode.BAD_REQUEST
    assert f"'{field}'" in error.message
    assert error.re == 1


@pytest.mark.parametrize(("name", "field", "value"), INVALID, ids=lambda v: repr(v)[:30])
def test_invalid_field(name: str, field: str, value: object) -> None:
    wire = {"type": name, "id": "req-1", **BASE[name], field: value}
    error = rejected(wire)
    assert error.code is ErrorCode.BAD_REQUEST
    assert error.message.startswith(f"field '{field}' must be ")
    assert error.re == "req-1"


def test_amount_message_matches_contract() -> None:
    error = rejected({"type": "tip", "id": 1, "room": "a", "amount": 0, "key": "k"})
    assert error.message == "field 'amount' must be an integer between 1 and 1000000"


def test_first_invalid_field_in_declaration_order_is_reported() -> None:
    error = rejected({"type": "tip", "room": "", "amount": 0, "key": ""})
    assert "'room'" in error.message


@pytest.mark.parametrize(
    ("name", "field", "value"),
    [
        ("hello", "token", "x" * 4096),
        ("hello", "token", "é" * 2048),  # 4096 bytes
        ("hello", "token", "x"),
        ("join", "room", "a" * 64),
        ("join", "room", "A-Z.a:z_09"),
        ("join", "since", f"{2**64 - 1}-{2**64 - 1}"),  # each part a uint64
        ("join", "since", "0-0"),
        ("say", "text", "x" * 1000),
        ("say", "text", "☃" * 1000),  # characters, not bytes
        ("say", "text", "x"),
        ("say", "text", "\x00"),
        ("tip", "amount", 1),
        ("tip", "amount", 1_000_000),
        ("tip", "key", "k" * 64),
        ("tip", "text", ""),
        ("tip", "text", "x" * 255),
        ("dm", "text", "x" * 1000),
        ("dm", "max_price", 0),
        ("dm", "max_price", 1_000_000),
    ],
    ids=lambda v: repr(v)[:30],
)
def test_boundaries_accepted(name: str, field: str, value: object) -> None:
    cmd = parse_command({"type": name, **BASE[name], field: value})
    assert getattr(cmd, field) == value


@pytest.mark.parametrize(("wire", "cmd"), VALID, ids=lambda v: str(v)[:40])
def test_command_to_dict(wire: dict[str, Any], cmd: Command) -> None:
    as_dict = command_to_dict(cmd)
    assert parse_command(as_dict) == cmd
    # absent id and optional fields are left out rather than sent as null
    assert None not in as_dict.values()


def test_command_to_dict_shape() -> None:
    assert command_to_dict(Tip(1, "alice", 5, "k")) == {
        "type": "tip",
        "id": 1,
        "room": "alice",
        "amount": 5,
        "key": "k",
        "text": "",
    }
    assert command_to_dict(Ping(None)) == {"type": "ping"}


def test_same_command_from_both_codecs() -> None:
    wire = {"type": "dm", "id": "d", "to": "alice", "text": "é", "key": "k", "max_price": 3}
    assert decode_command(JSON, orjson.dumps(wire)) == decode_command(MSGPACK, msgpack.packb(wire))


def test_key_message_names_the_rule() -> None:
    error = rejected({"type": "tip", "id": 1, "room": "a", "amount": 1, "key": "k\x00x"})
    assert error.message == "field 'key' must be 1 to 64 printable ASCII characters (0x20-0x7E)"


@pytest.mark.parametrize("key", [" ", "~", "a b", "x" * 64, "".join(map(chr, range(0x20, 0x5F)))])
def test_printable_ascii_keys_pass(key: str) -> None:
    wire = {"type": "tip", "room": "a", "amount": 1, "key": key}
    assert parse_command(wire) == Tip(None, "a", 1, key)


def test_moderation_commands() -> None:
    mute = parse_command({"type": "mute", "room": "alice", "user": "bob", "seconds": 60})
    assert mute == Mute(None, "alice", "bob", 60)
    assert parse_command({"type": "ban", "room": "alice", "user": "bob"}) == Ban(
        None, "alice", "bob", None
    )
    assert parse_command({"type": "slow", "room": "alice", "seconds": 0}) == Slow(None, "alice", 0)
    for frame in (
        {"type": "mute", "room": "alice", "user": "bob", "seconds": 0},
        {"type": "mute", "room": "alice", "user": "bob"},
        {"type": "ban", "room": "alice", "user": "bob", "seconds": RESTRICTION_S_MAX + 1},
        {"type": "slow", "room": "alice", "seconds": SLOW_S_MAX + 1},
        {"type": "kick", "room": "alice", "user": ""},
        {"type": "clear", "room": "alice"},
    ):
        with pytest.raises(ProtocolError) as refused:
            parse_command(frame)
        assert refused.value.code is ErrorCode.BAD_REQUEST, frame
