from tokenchat.protocol import (
    CloseCode,
    ErrorCode,
    ProtocolError,
    balance_event,
    dm_event,
    error,
    message_event,
    ok,
    presence_event,
    tip_event,
    welcome,
)


def test_error_codes_are_their_names() -> None:
    assert len(ErrorCode) == 19
    assert ErrorCode.SLOW_MODE == "SLOW_MODE"
    # A spending limit is SPEND_LIMIT, never LIMIT_EXCEEDED (a count limit).
    assert {"SPEND_LIMIT", "SELF_EXCLUDED", "LIMIT_EXCEEDED"} <= {c.name for c in ErrorCode}
    for code in ErrorCode:
        assert code.value == code.name
        assert str(code) == code.name


def test_close_codes() -> None:
    assert {code.name: code.value for code in CloseCode} == {
        "NORMAL": 1000,
        "GOING_AWAY": 1001,
        "MESSAGE_TOO_BIG": 1009,
        "INTERNAL_ERROR": 1011,
        "SERVICE_RESTART": 1012,
        "UNAUTHENTICATED": 4001,
        "FORBIDDEN": 4003,
        "TOO_SLOW": 4008,
        "RATE_LIMITED": 4029,
    }


def test_protocol_error() -> None:
    exc = ProtocolError(ErrorCode.BAD_REQUEST, "field 'x' must be y", re=7)
    assert (exc.code, exc.message, exc.re) == (ErrorCode.BAD_REQUEST, "field 'x' must be y", 7)
    assert str(exc) == "field 'x' must be y"
    assert ProtocolError(ErrorCode.INTERNAL, "m").re is None


def test_ok() -> None:
    assert ok(1) == {"type": "ok", "re": 1}
    assert ok(None) == {"type": "ok"}
    assert ok("a", balance=5, tx="t1") == {"type": "ok", "re": "a", "balance": 5, "tx": "t1"}


def test_error() -> None:
    assert error(3, ErrorCode.NOT_IN_ROOM, "join first") == {
        "type": "error",
        "re": 3,
        "code": "NOT_IN_ROOM",
        "message": "join first",
    }
    assert "re" not in error(None, ErrorCode.BAD_REQUEST, "m")


def test_welcome() -> None:
    assert welcome(1, "bob", "fan", 10, "s1") == {
        "type": "welcome",
        "re": 1,
        "user": {"id": "bob", "role": "fan"},
        "balance": 10,
        "session": "s1",
    }
    assert "re" not in welcome(None, "bob", "fan", 10, "s1")


def test_events_have_wire_names_and_no_re() -> None:
    assert message_event("alice", "bob", "hi", "1-0", 5) == {
        "type": "message",
        "room": "alice",
        "from": "bob",
        "text": "hi",
        "tier": 0,
        "offset": "1-0",
        "ts": 5,
    }
    assert tip_event("alice", "bob", 3, "", "1-1", 6) == {
        "type": "tip",
        "room": "alice",
        "from": "bob",
        "amount": 3,
        "text": "",
        "tier": 0,
        "offset": "1-1",
        "ts": 6,
    }
    assert dm_event("alice", "hey", 0, "t9", 7) == {
        "type": "dm",
        "from": "alice",
        "text": "hey",
        "tier": 0,
        "price": 0,
        "tx": "t9",
        "ts": 7,
    }
    assert presence_event("alice", 12) == {"type": "presence", "room": "alice", "viewers": 12}
    assert balance_event(40) == {"type": "balance", "balance": 40}
