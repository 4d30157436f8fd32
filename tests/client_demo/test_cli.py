"""The terminal client (``python -m tokenchat.client_demo.cli``, ``tokenchat chat``) in a
subprocess, driven through its standard input against a running server."""

from __future__ import annotations

import asyncio
import shutil
import sys
from pathlib import Path
from typing import Any

from tests.conftest import Http, Running, eventually, token
from tokenchat.client_demo.cli import format_event
from tokenchat.protocol.limits import HISTORY_PAGE_LEN

ROOT = Path(__file__).resolve().parents[2]
# Start-up (imports) plus a round trip or two; generous for a loaded machine.
EXPECT_TIMEOUT_S = 15.0


class Chat:
    """The terminal client in a subprocess: lines in, lines out."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []

    @classmethod
    async def start(cls, *args: str, command: tuple[str, ...] | None = None) -> Chat:
        process = await asyncio.create_subprocess_exec(
            *(command or (sys.executable, "-m", "tokenchat.client_demo.cli")),
            *args,
            cwd=ROOT,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        return cls(process)

    @classmethod
    async def signed_in(
        cls, server: Running, user: str, role: str = "fan", *, room: str | None = None
    ) -> Chat:
        """``tokenchat chat`` against ``server`` as ``user``, with its HTTP
        API (``--http``), in ``room`` if given."""
        args = ["--url", server.ws_url, "--token", token(user, role), "--http", server.http_url]
        return await cls.start(*args, *(("--room", room) if room else ()))

    async def send(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line.encode() + b"\n")
        await self.process.stdin.drain()

    async def expect(self, *wanted: str) -> list[str]:
        """Read lines until each of ``wanted`` is in one of them, in any order."""
        assert self.process.stdout is not None
        missing = list(wanted)
        found: list[str] = []
        try:
            async with asyncio.timeout(EXPECT_TIMEOUT_S):
                while missing:
                    raw = await self.process.stdout.readline()
                    assert raw, f"the client exited; still expected {missing}: {self.lines}"
                    line = raw.decode().rstrip("\n")
                    self.lines.append(line)
                    for text in missing:
                        if text in line:
                            missing.remove(text)
                            found.append(line)
                            break
        except TimeoutError:
            raise AssertionError(f"never printed {missing}; output: {self.lines}") from None
        return found

    async def exit_code(self) -> int:
        assert self.process.stdout is not None
        async with asyncio.timeout(EXPECT_TIMEOUT_S):
            rest = await self.process.stdout.read()
            self.lines += rest.decode().splitlines()
            return await self.process.wait()

    async def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


async def test_dm_sends_the_price_it_showed_and_a_raise_is_refused(server: Running) -> None:
    """/dm pays at most the price the client last showed (max_price on the
    wire): a price raised since is PRICE_CHANGED, nothing charged, and the
    next /dm shows the new price before paying it."""
    http = Http(server)
    model = await server.client("alice", "model")
    status, _ = await http.call("PUT", "/v1/me/prices", "alice", "model", dm=3)
    assert status == 200
    await http.credit("bob", 100)
    chat = await Chat.signed_in(server, "bob")
    try:
        await chat.expect("* connected as bob (fan); balance 100")
        await chat.send("/dm alice first")
        await chat.expect(
            "* a DM to alice costs 3 tokens", "* DM sent to alice (3 tokens); balance 97"
        )
        status, _ = await http.call("PUT", "/v1/me/prices", "alice", "model", dm=5)
        assert status == 200
        await chat.send("/dm alice second")
        await chat.expect("error PRICE_CHANGED:")
        await chat.send("/balance")
        await chat.expect("balance: 97")
        await chat.send("/dm alice third")
        await chat.expect(
            "* a DM to alice costs 5 tokens", "* DM sent to alice (5 tokens); balance 92"
        )
        assert [(await model.next_event("dm"))["text"] for _ in range(2)] == ["first", "third"]
    finally:
        await chat.kill()
        await model.close()


async def test_join_say_tip_dm_balance_and_reconnect(server: Running) -> None:
    http = Http(server)
    model = await server.client("alice", "model")
    await model.call("join", room="alice")
    await model.call("say", room="alice", text="welcome all")
    status, _ = await http.call("PUT", "/v1/me/prices", "alice", "model", dm=3)
    assert status == 200
    await http.credit("bob", 100)
    chat = await Chat.signed_in(server, "bob", room="alice")
    try:
        await chat.expect(
            "* connected as bob (fan); balance 100",
            "* joined alice (2 here, tip min 1)",
            "[alice] alice: welcome all",  # history
        )
        await chat.send("hello everyone")
        await chat.expect("[alice] bob: hello everyone")
        assert (await model.next_event("message"))["text"] == "welcome all"  # its own
        assert (await model.next_event("message"))["text"] == "hello everyone"
        await model.call("say", room="alice", text="hi bob")
        await chat.expect("[alice] alice: hi bob")

        await chat.send("/tip 5 nice show")
        await chat.expect("* tipped 5 in alice; balance 95", "[alice] bob tipped 5: nice show")
        await chat.send("/dm alice are you there?")
        await chat.expect("* DM sent to alice (3 tokens); balance 92")
        dm = await model.next_event("dm")
        assert dm["from"] == "bob" and dm["text"] == "are you there?" and dm["price"] == 3
        await model.call("dm", to="bob", text="yes!", key="dm-1")  # fans take DMs for free
        await chat.expect("DM from alice (free): yes!")
        await chat.send("/balance")
        await chat.expect("balance: 92")

        # The server drops the connection: the client says so, comes back,
        # and shows what was said meanwhile.
        node = server.process.node
        assert node is not None
        (bob,) = [s for s in node.sessions if s.identity and s.identity.user_id == "bob"]
        await bob.ws.close(1012, "server restarting")
        await model.call("say", room="alice", text="while you were away")
        await chat.expect(
            "* connection lost (code 1012, server restarting); reconnecting in",
            "[alice] alice: while you were away",
            "* reconnected",
        )

        await chat.send("/rooms")
        (rooms,) = await chat.expect("room")
        # GET /v1/rooms is being added to the HTTP API; either answer is handled.
        assert rooms.startswith("rooms: alice (2 viewers)") or "answered 404" in rooms, rooms
        await chat.send("/tip lots")
        await chat.expect("usage: /tip N [TEXT]")
        await chat.send("/tip 1000")
        await chat.expect("error INSUFFICIENT_FUNDS:")
        await chat.send("/dm nobody hello")
        await chat.expect("error NOT_FOUND:")
        await chat.send("/leave")
        await chat.expect("* left alice")
        await chat.send("anyone?")
        await chat.expect("error: join a room first (/join ROOM)")
        await chat.send("/quit")
        assert await chat.exit_code() == 0
    finally:
        await chat.kill()
        await model.close()
    assert (await http.call("GET", "/v1/me", "bob"))[1]["balance"] == 92


async def test_a_reconnect_shows_more_than_a_page_of_missed_lines_in_order(
    start_server: Any,
) -> None:
    """Away longer than a history page holds (issue #16 part 6): the client
    pages through all of it by itself, each line once, in order."""
    server = await start_server(commands_per_s=10_000.0, commands_burst=10_000)
    model = await server.client("alice", "model")
    await model.call("join", room="alice")
    # None seen before the drop: the re-join reads the room from its first event.
    chat = await Chat.signed_in(server, "bob", room="alice")
    missed = [f"away {n}" for n in range(HISTORY_PAGE_LEN + 50)]
    try:
        await chat.expect("* joined alice")
        node = server.process.node
        assert node is not None
        (bob,) = [s for s in node.sessions if s.identity and s.identity.user_id == "bob"]
        # 4029 asks the client to stay away for seconds (BACKOFF_RATE_LIMITED_S):
        # the lines below are all said before it comes back.
        await bob.ws.close(4029, "rate limited past tolerance")
        await chat.expect("* connection lost (code 4029")
        for text in missed:
            await model.call("say", room="alice", text=text)
        await chat.expect("* reconnected", f"[alice] alice: {missed[-1]}")
        await model.call("say", room="alice", text="back live")
        await chat.expect("[alice] alice: back live")
        shown = [line.removeprefix("[alice] alice: ") for line in chat.lines if "alice: " in line]
        assert shown == [*missed, "back live"]
    finally:
        await chat.kill()
        await model.close()


async def test_a_relayed_tip_from_the_terminal(start_server: Any) -> None:
    """Delivery mode `relay`: the reply has no offset; the terminal client
    says the tip went through and shows its event once, from the relay."""
    server = await start_server(delivery="relay")
    await Http(server).credit("bob", 100)
    model = await server.client("alice", "model")
    await model.call("join", room="alice")
    chat = await Chat.signed_in(server, "bob", room="alice")
    try:
        await chat.expect("* connected as bob (fan); balance 100", "* joined alice")
        await chat.send("/tip 5 relayed")
        await chat.expect("* tipped 5 in alice; balance 95", "[alice] bob tipped 5: relayed")
        tip = await model.next_event("tip")
        assert tip["amount"] == 5 and tip["tx"] and tip["offset"]
        await chat.send("/quit")
        assert await chat.exit_code() == 0
    finally:
        await chat.kill()
        await model.close()


async def test_piped_input_runs_to_its_end(server: Running) -> None:
    chat = await Chat.start("--url", server.ws_url, "--token", token("carol"))
    try:
        assert chat.process.stdin is not None
        chat.process.stdin.write(b"/balance\nnot in a room\n")
        chat.process.stdin.close()  # the end of the input ends the client
        assert await chat.exit_code() == 0
    finally:
        await chat.kill()
    assert chat.lines == [
        "* connected as carol (fan); balance 0",
        "balance: 0",
        "error: join a room first (/join ROOM)",
    ]


async def test_tokenchat_chat_with_a_bad_token_exits_at_once(server: Running) -> None:
    script = shutil.which("tokenchat", path=str(Path(sys.executable).parent))
    command = (script,) if script else (sys.executable, "-m", "tokenchat.server.cli")
    chat = await Chat.start("chat", "--url", server.ws_url, "--token", "bad", command=command)
    try:
        assert await chat.exit_code() == 1
    finally:
        await chat.kill()
    assert any("UNAUTHENTICATED" in line for line in chat.lines), chat.lines


def test_event_lines() -> None:
    assert format_event({"type": "presence", "room": "a", "viewers": 1}) == "[a] 1 viewer"
    assert format_event({"type": "tip", "room": "a", "from": "b", "amount": 2, "text": ""}) == (
        "[a] b tipped 2"
    )
    assert format_event({"type": "gap", "room": "a"}) == (
        "[a] * some messages were missed while disconnected (the room no longer keeps "
        "them); the oldest it keeps follow"
    )
    assert format_event({"type": "error", "code": "RATE_LIMITED", "message": "slow down"}) == (
        "error RATE_LIMITED: slow down"
    )
    line = format_event({"type": "reconnecting", "code": None, "reason": "refused", "delay_s": 2})
    assert line == "* could not reconnect (refused); reconnecting in 2.0 s"


async def test_custom_requests_from_the_terminal(server: Running) -> None:
    http = Http(server)
    model = await server.client("alice", "model")
    await http.credit("bob", 100)
    chat = await Chat.start("--url", server.ws_url, "--token", token("bob"))
    try:
        await chat.expect("* connected as bob (fan); balance 100")
        await chat.send("/offer alice 30 a photo of the sea")
        lines = await chat.expect("offered to alice; balance 70", "30 tokens, offered")
        (offered,) = [line for line in lines if line.startswith("* ")]
        (event,) = [line for line in lines if not line.startswith("* ")]
        request_id = offered.split()[2]
        assert event.startswith(f"request {request_id} bob -> alice: 30 tokens, offered: a ")
        await model.call("request_accept", request=request_id)
        await chat.expect(f"request {request_id} bob -> alice: 30 tokens, accepted")
        await model.call("request_deliver", request=request_id, text="here", media="sea.jpg")
        await chat.expect("30 tokens, delivered: a photo of the sea | delivered: here [sea.jpg]")
        await chat.send("/offer alice 20 a song")
        await chat.expect("offered to alice; balance 50")
        await chat.send("/requests")
        await chat.expect("1. r_", "2. r_")
        await chat.send("/cancel 1")  # the newest: the song
        await chat.expect("cancelled", "balance: 70")
        await chat.send("/cancel 2")
        await chat.expect("error CONFLICT:")
        await chat.send("/accept 2")
        await chat.expect("error FORBIDDEN:")
        await chat.send("/offer alice lots")
        await chat.expect("usage: /offer MODEL N TEXT")
        await chat.send("/quit")
        assert await chat.exit_code() == 0
    finally:
        await chat.kill()
        await model.close()
    assert (await http.call("GET", "/v1/me", "alice", "model"))[1]["balance"] == 30


async def test_upload_post_and_unlock_media(server: Running, tmp_path: Path) -> None:
    import io

    import httpx
    from PIL import Image

    http = Http(server)
    await http.credit("bob", 20)
    picture = tmp_path / "photo.jpg"
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (10, 120, 200)).save(buffer, "JPEG")
    picture.write_bytes(buffer.getvalue())
    model = await Chat.signed_in(server, "alice", "model")
    fan = await Chat.signed_in(server, "bob")
    try:
        await model.expect("* connected as alice")
        await fan.expect("* connected as bob")
        await fan.send("/join alice")
        await fan.expect("* joined alice")
        await model.send(f"/upload {picture} 7")
        [uploaded] = await model.expect("* uploaded m_")
        media = uploaded.split()[2]
        await model.send("/join alice")
        await model.send(f"/post {media} fresh")
        await model.expect(f"* posted {media} in alice")
        [card] = await fan.expect("[alice] alice posted a photo")
        assert card.endswith(f"7 tokens: /unlock {media}: fresh"), card
        await fan.send(f"/unlock {media}")
        [unlocked] = await fan.expect(f"* unlocked {media} for 7 tokens; balance 13")
        url = unlocked.rsplit(": ", 1)[1]
        assert url.startswith(f"{server.http_url}/v1/media/{media}/content?")
        async with httpx.AsyncClient() as client:
            assert (await client.get(url)).content == picture.read_bytes()
        await model.expect("balance: 7")
        await fan.send(f"/unlock {media}")
        await fan.expect(f"* {media} is yours already (nothing charged)")
        await fan.send(f"/url {media}")
        await fan.expect(f"* {media}: {server.http_url}/v1/media/{media}/content?")
        await fan.send("/unlock m_unknown")
        await fan.expect("error: no price seen for this media")
        await fan.send("/unlock --max 5 m_unknown")
        await fan.expect("error NOT_FOUND")
    finally:
        await model.kill()
        await fan.kill()


async def test_a_private_show_from_the_terminal(start_server: Any) -> None:
    server: Running = await start_server(
        private_tick_s=1, private_meter_interval_s=0.1, private_settle_grace_s=0.5
    )
    http = Http(server)
    model = await server.client("alice", "model")
    status, _ = await http.call(
        "PUT", "/v1/me/prices", "alice", "model", private_rate=60, private_min_s=0
    )
    assert status == 200
    await http.credit("bob", 100)
    chat = await Chat.start("--url", server.ws_url, "--token", token("bob"))
    try:
        await chat.expect("* connected as bob (fan); balance 100")
        await chat.send("/private alice 59")
        await chat.expect("error PRICE_CHANGED:")
        await chat.send("/private alice 60")
        lines = await chat.expect("requested from alice at 60/min", "60 tokens/min, requested")
        (requested,) = [line for line in lines if line.startswith("* ")]
        show = requested.split()[3]
        assert f"private {show} bob -> alice: 60 tokens/min, requested" in lines[0] + lines[1]
        await model.call("private_accept", show=show)
        await chat.expect(f"private {show} bob -> alice: 60 tokens/min, running, 2 s")
        await chat.send(f"/join p:{show}")
        await chat.expect(f"* joined p:{show}")
        await chat.send(f"/pend {show}")
        (ended,) = await chat.expect(f"* private show {show} ended:")
        seconds = int(ended.split("ended: ")[1].split(" s")[0])
        assert f"{seconds} s, {seconds} tokens" in ended
        await chat.send("/private alice")
        await chat.expect("usage: /private MODEL RATE")
        await chat.send("/quit")
        assert await chat.exit_code() == 0
    finally:
        await chat.kill()
        await model.close()
    assert (await http.call("GET", "/v1/me", "alice", "model"))[1]["balance"] >= 2


async def test_ticket_shows_from_the_terminal(server: Running) -> None:
    http = Http(server)
    await http.credit("bob", 100)
    await (await server.client("alice", "model")).close()  # her room exists
    model = await Chat.signed_in(server, "alice", "model")
    fan = await Chat.signed_in(server, "bob")
    carol = await server.client("carol")
    try:
        await model.expect("* connected as alice (model)")
        await fan.expect("* connected as bob (fan); balance 100")
        await model.send("/schedule 10 1 0 Friday night")
        (scheduled,) = await model.expect("scheduled: Friday night (10 tokens a ticket, min 1 s)")
        show = scheduled.split()[2]
        await model.send("/join alice")
        await fan.send("/join alice")
        await fan.expect(
            f"* show {show} scheduled: Friday night (10 tokens a ticket, min 1 s); no ticket"
        )
        await carol.call("join", room="alice")
        await fan.send("/shows")
        await fan.expect(f"1. {show} scheduled")
        await fan.send("/ticket 1")
        await fan.expect(f"* ticket bought for show {show}; balance 90")
        await fan.send("/ticket 1")
        await fan.expect("you had a ticket already")
        await model.send(f"/start {show}")
        await model.expect(f"* show {show} running")
        await fan.expect(f"[alice] show {show} running")
        await model.send("only for ticket holders")
        await fan.expect("[alice] alice: only for ticket holders")
        await asyncio.sleep(1.1)
        await model.send(f"/end {show}")
        await model.expect(f"* show {show} ended, release", "balance: 10")
        await model.send("/schedule 10 1 0 x" + "y" * 300)
        await model.expect("error BAD_REQUEST:")
        await model.send("/quit")
        await fan.send("/quit")
        assert await model.exit_code() == 0 and await fan.exit_code() == 0
        # carol, without a ticket, saw the show's events but not its chat.
        seen: list[dict[str, Any]] = []
        while not carol.events.empty():
            seen.append(carol.events.get_nowait())
        assert [e["state"] for e in seen if e["type"] == "show"] == ["running", "ended"]
        assert not [e for e in seen if e["type"] == "message"]
    finally:
        await model.kill()
        await fan.kill()
        await carol.close()


def test_show_lines() -> None:
    line = format_event(
        {
            "type": "show",
            "room": "a",
            "show": "t_1",
            "state": "running",
            "title": "T",
            "price": 5,
            "min_s": 60,
        }
    )
    assert line == "[a] show t_1 running: T (5 tokens a ticket, min 60 s)"


async def test_moderation_from_the_terminal(server: Running) -> None:
    """The model mutes, clears and bans a fan with /mute, /clear and /ban;
    the fan's terminal shows the refusal, the clear and the removal."""
    bob = await server.client("bob")
    model = await Chat.start("--url", server.ws_url, "--token", token("alice", "model"))
    fan = await Chat.start("--url", server.ws_url, "--token", token("carol"))
    try:
        await model.send("/join alice")
        await model.expect("* joined alice")
        await bob.call("join", room="alice")
        await fan.send("/join alice")
        await fan.expect("* joined alice")
        await fan.send("spam spam")
        await model.expect("[alice] carol: spam spam")
        await model.send("/mute carol 60")
        await model.expect("* carol muted in alice until ")
        await fan.send("hello?")
        await fan.expect("error MUTED: you are muted in room 'alice' (until ")
        await model.send("/clear carol")
        await model.expect("* carol cleared in alice")
        await fan.expect("[alice] * carol's messages were cleared by a moderator")
        await model.send("/slow 5")
        await model.expect("* slow mode in alice: 5 s")
        await model.send("/ban carol")
        await model.expect("* carol banned in alice")
        await fan.expect("[alice] * you were banned from alice")
        await fan.send("/join alice")
        await fan.expect("error BANNED: you are banned from room 'alice'")
        await model.send("/kick nobody here")
        await model.expect("usage: /kick USER")
        await fan.send("/kick bob")  # her current room is still alice: not hers to moderate
        await fan.expect("error FORBIDDEN: only room 'alice''s model and her moderators")
    finally:
        await model.kill()
        await fan.kill()
        await bob.close()


async def test_spending_limits_from_the_terminal(server: Running) -> None:
    await Http(server).credit("bob", 100)
    await (await server.client("alice", "model")).close()  # her room exists
    fan = await Chat.signed_in(server, "bob")
    try:
        await fan.expect("* connected as bob (fan); balance 100")
        await fan.send("/limits daily 15")
        await fan.expect("* daily: spent 0, limit 15, 15 left", "* weekly: spent 0, no limit")
        await fan.send("/join alice")
        await fan.expect("* joined alice")
        await fan.send("/tip 10")
        await fan.expect("balance 90")
        await fan.send("/tip 10")
        await fan.expect("error SPEND_LIMIT: your daily limit leaves 5 tokens until")
        await fan.send("/limits daily 50")
        (line,) = await fan.expect("; becomes 50 at")
        assert line.startswith("* daily: spent 10, limit 15, 5 left")
        await fan.send("/limits yearly 5")
        await fan.expect("usage: /limits")
        await fan.send("/exclude 2")
        await fan.expect("* self-excluded until")
        await fan.send("/tip 1")
        await fan.expect("error SELF_EXCLUDED: you excluded yourself until")
        await fan.send("/quit")
        assert await fan.exit_code() == 0
    finally:
        await fan.kill()


def test_reality_check_line() -> None:
    event = {"type": "reality_check", "online_s": 3720, "spent": 42, "every_min": 60}
    assert format_event(event) == "* reality check: online 62 min, spent 42 tokens"


async def test_discovery_follows_and_live_from_the_terminal(start_server: Any) -> None:
    """Issue #13: /rooms with a sort and a tag, /follow, the `live` line when
    the followed model comes back, /notifications, /follows, /unfollow."""
    server = await start_server(live_away_s=0.3, discovery_refresh_s=0.05)
    http = Http(server)
    await (await server.client("zed", "model")).close()
    alice = await server.client("alice", "model")
    await alice.call("join", room="alice")
    status, _ = await http.call(
        "PUT", "/v1/me/profile", "alice", "model", display_name="Alice", tags=["jazz"]
    )
    assert status == 200
    fan = await Chat.start(
        "--url", server.ws_url, "--token", token("bob"), "--http", server.http_url
    )
    try:
        await fan.expect("* connected as bob (fan)")
        await fan.send("/rooms new #jazz")
        (rooms,) = await fan.expect("rooms:")
        assert rooms.startswith("rooms: alice (1 viewer)") and "zed" not in rooms, rooms
        await fan.send("/follow alice")
        await fan.expect("* following alice")
        await fan.send("/follow nobody")
        await fan.expect("error NOT_FOUND")
        await alice.close()
        await asyncio.sleep(0.5)  # away for longer than live_away_s
        back = await server.client("alice", "model")
        await back.call("join", room="alice")
        await fan.expect("* alice is live (/join alice)")

        # Connected followers are told before the notifications are stored
        # (Discovery: tell every node, then store), so wait for the row.
        async def stored() -> bool:
            status, page = await http.call("GET", "/v1/me/notifications", "bob", "fan")
            return status == 200 and bool(page["notifications"])

        await eventually(stored)
        await fan.send("/notifications")
        await fan.expect("alice went live")
        await fan.send("/follows")
        await fan.expect("following: alice")
        await fan.send("/unfollow alice")
        await fan.expect("* no longer following alice")
        await fan.send("/follows")
        await fan.expect("following: nobody")
        await fan.send("/quit")
        assert await fan.exit_code() == 0
        await back.close()
    finally:
        await fan.kill()


async def test_rooms_more_continues_the_same_ranking(start_server: Any) -> None:
    """/rooms shows a page (cli.ROOMS_PAGE rooms) and says there is more;
    /rooms more continues that ranking although a room jumped to the top
    meanwhile: no room twice, none skipped."""
    from tokenchat.client_demo.cli import ROOMS_PAGE

    server = await start_server(discovery_refresh_s=0.05)
    http = Http(server)
    names = [f"m{n:02d}" for n in range(ROOMS_PAGE + 2)]
    for name in names:
        assert (await http.call("GET", "/v1/me", name, "model"))[0] == 200
    fan = await Chat.start(
        "--url", server.ws_url, "--token", token("bob"), "--http", server.http_url
    )
    watcher = await server.client("eve")
    try:
        await fan.expect("* connected as bob (fan)")
        await fan.send("/rooms more")
        await fan.expect("no more rooms")
        await fan.send("/rooms")
        (first,) = await fan.expect("rooms:")
        assert first.endswith("(more: /rooms more)"), first
        assert first.startswith(f"rooms: {names[0]} (0 viewers), ") and names[-1] not in first
        # The last room gains a viewer: a fresh listing puts it first.
        await watcher.call("join", room=names[-1])

        async def moved() -> bool:
            status, page = await http.call("GET", "/v1/rooms?limit=1")
            return status == 200 and page["rooms"][0]["id"] == names[-1]

        await eventually(moved)
        await fan.send("/rooms more")
        (second,) = await fan.expect("rooms:")
        assert second == f"rooms: {names[-2]} (0 viewers), {names[-1]} (1 viewer)", second
        await fan.send("/rooms more")
        await fan.expect("no more rooms")
        await fan.send("/quit")
        assert await fan.exit_code() == 0
    finally:
        await watcher.close()
        await fan.kill()


def test_rooms_query_words() -> None:
    from tokenchat.client_demo.cli import rooms_query

    assert rooms_query("") == ""
    assert rooms_query("trending") == "?sort=trending"
    assert rooms_query("new #jazz late night") == "?sort=new&tag=jazz&q=late+night"
    assert rooms_query("piano") == "?q=piano"


def test_clear_lines_say_whether_a_moderator_or_a_deletion_removed_them() -> None:
    assert format_event({"type": "clear", "room": "a", "user": "b"}) == (
        "[a] * b's messages were cleared by a moderator"
    )
    assert format_event({"type": "clear", "room": "a", "user": "b", "all": True}) == (
        "[a] * b deleted their account: their lines are gone"
    )


async def test_failover_url_resumes_on_another_node(start_server: Any) -> None:
    """``--failover-url``: the node the client is on stops for good, and the
    client resumes on the other one, with what was said meanwhile."""
    first = await start_server()
    second = await start_server()
    model = await second.client("alice", "model")
    await model.call("join", room="alice")
    args = ["--url", first.ws_url, "--failover-url", second.ws_url, "--token", token("bob")]
    chat = await Chat.start(*args, "--room", "alice")
    try:
        await chat.expect("* connected as bob (fan)", "* joined alice")
        await first.process.stop()
        await model.call("say", room="alice", text="said while you moved")
        await chat.expect("* reconnected", "[alice] alice: said while you moved")
        await chat.send("still here")
        await chat.expect("[alice] bob: still here")
        assert (await model.next_event("message"))["text"] == "said while you moved"
        assert (await model.next_event("message"))["text"] == "still here"
        await chat.send("/quit")
        assert await chat.exit_code() == 0
    finally:
        await chat.kill()
        await model.close()
