"""Discovery, profiles, follows and live notifications (issue #13 sections 2
and 3) against real Redis, Postgres and server processes: the room listing's
sorts, filters and pages; profiles with prices and menu; follows; the `live`
event to connected followers and stored notifications for every follower;
no second notification inside live_away_s; a job a dead node left is resumed;
hostile input."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.asyncio import Redis

from tests.conftest import Http, Running, eventually, pg
from tests.proxy import Proxy
from tokenchat.server.config import Settings


@pytest.fixture
async def server(start_server: Any) -> Running:
    running: Running = await start_server(
        live_away_s=0.3,
        live_job_interval_s=0.05,
        live_batch_followers=7,
        discovery_refresh_s=0.05,
    )
    return running


async def listing(server: Running, query: str = "") -> dict[str, Any]:
    status, reply = await Http(server).call("GET", f"/v1/rooms{query}")
    assert status == 200, reply
    return dict(reply)


async def ids(server: Running, query: str) -> list[str]:
    return [room["id"] for room in (await listing(server, query))["rooms"]]


async def profile(server: Running, model: str, **body: Any) -> tuple[int, Any]:
    return await Http(server).call("PUT", "/v1/me/profile", model, "model", **body)


async def test_profile_with_prices_and_menu(server: Running) -> None:
    http = Http(server)
    status, saved = await profile(
        server,
        "alice",
        display_name="Alice",
        bio="Jazz and chat",
        tags=["jazz", "music"],
        avatar="https://img.example/alice.png",
        online_status="online",
    )
    assert status == 200, saved
    status, _ = await http.call("PUT", "/v1/me/prices", "alice", "model", dm=5)
    assert status == 200
    status, _ = await http.call(
        "PUT", "/v1/me/menu", "alice", "model", items=[{"label": "song", "price": 20}]
    )
    assert status == 200
    status, got = await http.call("GET", "/v1/models/alice")
    assert status == 200, got
    assert got["display_name"] == "Alice" and got["tags"] == ["jazz", "music"]
    assert got["avatar"] == "https://img.example/alice.png"
    assert got["online_status"] == "online" and got["followers"] == 0
    assert got["prices"]["dm"] == 5 and "private_rate" in got["prices"]
    assert [(i["label"], i["price"]) for i in got["menu"]] == [("song", 20)]


@pytest.mark.parametrize(
    "body",
    [
        {"display_name": 5},
        {"display_name": "x" * 65},
        {"bio": "x" * 1001},
        {"tags": "jazz"},
        {"tags": ["Jazz"]},
        {"tags": ["a"] * 11},
        {"tags": [1]},
        {"avatar": "javascript:alert(1)"},
        {"avatar": "data:image/png;base64,AAAA"},
        {"avatar": "https://x/" + "a" * 600},
        {"online_status": "sleeping"},
    ],
)
async def test_profile_refuses_hostile_input(server: Running, body: dict[str, Any]) -> None:
    status, reply = await profile(server, "alice", **body)
    assert status == 400 and reply["error"]["code"] == "BAD_REQUEST", reply


async def test_profile_needs_a_model_and_unknown_models_are_not_found(server: Running) -> None:
    http = Http(server)
    status, reply = await http.call("PUT", "/v1/me/profile", "bob", "fan", display_name="b")
    assert status == 403, reply
    for path in ("/v1/models/nobody", "/v1/models/" + "x" * 300, "/v1/models/a%20b"):
        status, reply = await http.call("GET", path)
        assert status == 404 and reply["error"]["code"] == "NOT_FOUND", (path, reply)
    await server.client("bob")  # a fan exists, but is no model
    status, reply = await http.call("GET", "/v1/models/bob")
    assert status == 404, reply


async def test_rooms_sort_filter_and_page(server: Running) -> None:
    models = {name: await server.client(name, "model") for name in ("ann", "bea", "cat")}
    await profile(server, "ann", display_name="Ann", bio="poetry night", tags=["poetry"])
    await profile(server, "bea", display_name="Bea", bio="jazz piano", tags=["jazz", "music"])
    await profile(server, "cat", display_name="Cat", bio="Jazz vocals", tags=["jazz"])
    fan = await server.client("fan")
    await Http(server).credit("fan", 100)
    await fan.call("join", room="cat")
    await fan.call("tip", room="cat", amount=30, key="t1")
    await fan.call("join", room="ann")
    await fan.call("tip", room="ann", amount=10, key="t2")
    await models["bea"].call("join", room="bea")
    assert await server.node.ledger.drain(10.0) == 0

    async def trending() -> bool:
        return (await ids(server, "?sort=trending"))[:3] == ["cat", "ann", "bea"]

    # The ranking is refreshed every discovery_refresh_s (1 s); a loaded CI
    # machine has taken over 5 s to show it.
    await eventually(trending, timeout_s=20.0)
    rooms = (await listing(server, "?sort=trending"))["rooms"]
    assert [r["trending"] for r in rooms] == [30, 10, 0]
    assert {"id", "owner", "viewers", "tip_min"} <= set(rooms[0])  # the old shape kept
    assert (await ids(server, "?sort=viewers"))[0] in ("ann", "bea", "cat")
    assert sorted(await ids(server, "?tag=jazz")) == ["bea", "cat"]
    assert sorted(await ids(server, "?q=JAZZ")) == ["bea", "cat"]
    assert await ids(server, "?q=poetry") == ["ann"]
    assert await ids(server, "?tag=jazz&q=piano") == ["bea"]
    assert await ids(server, "?tag=nothing") == []
    assert (await ids(server, "?sort=new"))[0] == "cat"  # the newest room first
    # Live: bea has a session in her own room; the others never joined theirs.
    live = {r["id"]: r["live"] for r in (await listing(server))["rooms"]}
    assert live == {"ann": False, "bea": True, "cat": False}
    first = await listing(server, "?sort=trending&limit=2")
    assert [r["id"] for r in first["rooms"]] == ["cat", "ann"]
    second = await listing(server, f"?sort=trending&limit=2&cursor={first['next_cursor']}")
    assert [r["id"] for r in second["rooms"]] == ["bea"] and second["next_cursor"] is None


@pytest.mark.parametrize(
    "query",
    [
        "?sort=best",
        "?limit=0",
        "?limit=201",
        "?limit=x",
        "?cursor=-1",
        "?cursor=abc",
        "?cursor=3",  # a position without its ranking (the old cursor)
        "?cursor=" + "9" * 30,
        "?cursor=0123456789abcdef-trending.2",  # a trending cursor, a viewers listing
        "?sort=new&cursor=0123456789abcdef-new.1234567890",
        "?tag=Bad%20Tag",
        "?q=" + "x" * 101,
    ],
)
async def test_rooms_refuse_hostile_queries(server: Running, query: str) -> None:
    status, reply = await Http(server).call("GET", f"/v1/rooms{query}")
    assert status == 400 and reply["error"]["code"] == "BAD_REQUEST", (query, reply)


async def test_room_pages_keep_one_ranking_across_nodes_while_ranks_change(
    start_server: Any,
) -> None:
    """A listing paged while the ranks move: page 2, read from another node
    after every fresh listing has the new order, continues page 1's order:
    no room twice, none skipped, and the tag filter pages the same way."""
    nodes = [await start_server(discovery_refresh_s=0.05) for _ in range(2)]
    names = [f"m{n}" for n in range(6)]
    for name in names:
        await nodes[0].client(name, "model")
        tags = ["even"] if int(name[1]) % 2 == 0 else ["odd"]
        assert (await profile(nodes[0], name, tags=tags))[0] == 200
    # No viewers yet: the viewers ranking is by id.
    first = await listing(nodes[0], "?limit=3")
    assert [r["id"] for r in first["rooms"]] == ["m0", "m1", "m2"]
    tagged = await listing(nodes[0], "?limit=2&tag=even")
    assert [r["id"] for r in tagged["rooms"]] == ["m0", "m2"]

    # The ranks change: m4 and m5 gain viewers, and go to the top.
    fans = [await nodes[1].client(f"fan{n}") for n in range(3)]
    await fans[0].call("join", room="m4")
    await fans[1].call("join", room="m4")
    await fans[2].call("join", room="m5")

    async def moved(node: Running) -> bool:
        return (await ids(node, "?limit=3"))[:2] == ["m4", "m5"]

    for node in nodes:
        await eventually(lambda node=node: moved(node))
    # A position in today's ranking would now give m1, m2, m3 (two seen twice,
    # m4 and m5 never); the cursor continues page 1's ranking, on either node.
    for node in nodes:
        second = await listing(node, f"?limit=3&cursor={first['next_cursor']}")
        assert [r["id"] for r in second["rooms"]] == ["m3", "m4", "m5"]
        assert second["next_cursor"] is None
        # Each room's figures are today's; only the order is page 1's.
        assert [r["viewers"] for r in second["rooms"]] == [0, 2, 1]
    seen = [r["id"] for r in first["rooms"]] + [r["id"] for r in second["rooms"]]
    assert sorted(seen) == names and len(set(seen)) == len(seen)
    rest = await listing(nodes[1], f"?limit=2&tag=even&cursor={tagged['next_cursor']}")
    assert [r["id"] for r in rest["rooms"]] == ["m4"] and rest["next_cursor"] is None
    # A fresh first page has the new order.
    assert await ids(nodes[1], "?limit=2&tag=even") == ["m4", "m0"]
    for fan in fans:
        await fan.close()


# The cursors' idle life in the expiry test: long enough that a loaded
# machine's request (a few hundred ms) stays well inside it.
IDLE_S = 2.0


async def test_an_idle_cursor_expires_with_a_clear_code(start_server: Any, redis: Redis) -> None:
    node = await start_server(discovery_refresh_s=0.05, discovery_cursor_idle_s=IDLE_S)
    for name in ("a1", "a2", "a3"):
        await node.client(name, "model")
    first = await listing(node, "?limit=1")
    # Read within the idle time: it works, and renews the cursor's ranking
    # (the two pauses add up to more than one idle time).
    await asyncio.sleep(IDLE_S * 0.6)
    second = await listing(node, f"?limit=1&cursor={first['next_cursor']}")
    await asyncio.sleep(IDLE_S * 0.6)
    third = await listing(node, f"?limit=1&cursor={second['next_cursor']}")
    assert [r["id"] for r in first["rooms"] + second["rooms"] + third["rooms"]] == [
        "a1",
        "a2",
        "a3",
    ]
    # Left idle past discovery_cursor_idle_s: gone here and in Redis.
    await asyncio.sleep(IDLE_S * 1.4)
    status, reply = await Http(node).call("GET", f"/v1/rooms?limit=1&cursor={first['next_cursor']}")
    assert status == 410 and reply["error"]["code"] == "CURSOR_EXPIRED", reply
    prefix = node.process.settings.redis_prefix
    assert [key async for key in redis.scan_iter(match=f"{prefix}rooms:pin:*")] == []
    # A first page starts a new listing.
    assert await ids(node, "?limit=3") == ["a1", "a2", "a3"]


async def test_room_pages_with_redis_cut(start_server: Any, redis_proxy: Proxy) -> None:
    """Redis away: a node still serves the later pages of a ranking it holds
    in memory; a cursor it cannot read answers UNAVAILABLE (503), and works
    once Redis is back."""
    cut = await start_server(
        redis_url=redis_proxy.url, redis_timeout_s=0.5, discovery_refresh_s=0.05
    )
    direct = await start_server(discovery_refresh_s=0.05)
    for name in ("b1", "b2", "b3"):
        await direct.client(name, "model")
    mine = await listing(cut, "?limit=1")
    theirs = await listing(direct, "?sort=new&limit=1")
    await redis_proxy.cut()
    try:
        second = await listing(cut, f"?limit=1&cursor={mine['next_cursor']}")
        assert [r["id"] for r in second["rooms"]] == ["b2"]
        status, reply = await Http(cut).call(
            "GET", f"/v1/rooms?sort=new&limit=1&cursor={theirs['next_cursor']}"
        )
        assert status == 503 and reply["error"]["code"] == "UNAVAILABLE", reply
        # The other node reads the pin the cut node wrote before the cut.
        assert await ids(direct, f"?limit=2&cursor={mine['next_cursor']}") == ["b2", "b3"]
    finally:
        await redis_proxy.restore()

    async def readable() -> bool:
        status, page = await Http(cut).call(
            "GET", f"/v1/rooms?sort=new&limit=1&cursor={theirs['next_cursor']}"
        )
        return status == 200 and [r["id"] for r in page["rooms"]] == ["b2"]

    await eventually(readable)


async def test_follow_unfollow_and_list(server: Running) -> None:
    http = Http(server)
    for name in ("m1", "m2", "m3"):
        await server.client(name, "model")
    await server.client("bob")
    for name in ("m2", "m1", "m3", "m1"):  # following twice is one follow
        status, reply = await http.call("PUT", f"/v1/me/follows/{name}", "bob")
        assert status == 200 and reply == {"model": name, "following": True}, reply
    status, page = await http.call("GET", "/v1/me/follows?limit=2", "bob")
    assert status == 200 and [f["model"] for f in page["follows"]] == ["m1", "m2"]
    status, page = await http.call(
        "GET", f"/v1/me/follows?limit=2&cursor={page['next_cursor']}", "bob"
    )
    assert [f["model"] for f in page["follows"]] == ["m3"] and page["next_cursor"] is None
    status, _ = await http.call("DELETE", "/v1/me/follows/m2", "bob")
    assert status == 200
    status, page = await http.call("GET", "/v1/me/follows", "bob")
    assert [f["model"] for f in page["follows"]] == ["m1", "m3"]
    status, got = await http.call("GET", "/v1/models/m1")
    assert got["followers"] == 1


async def test_follows_are_rate_limited_per_user_like_every_create(start_server: Any) -> None:
    server = await start_server(http_creates_burst=2, http_creates_per_s=0.01)
    http = Http(server)
    for name in ("m1", "m2", "m3"):
        await server.client(name, "model")
    for name in ("m1", "m2"):
        status, reply = await http.call("PUT", f"/v1/me/follows/{name}", "bob")
        assert status == 200, reply
    status, reply = await http.call("PUT", "/v1/me/follows/m3", "bob")
    assert status == 429 and reply["error"]["code"] == "RATE_LIMITED", reply
    status, page = await http.call("GET", "/v1/me/follows", "bob")
    assert [f["model"] for f in page["follows"]] == ["m1", "m2"], "the refused one made nothing"
    # Unfollowing creates nothing; another user has a bucket of their own.
    assert (await http.call("DELETE", "/v1/me/follows/m1", "bob"))[0] == 200
    assert (await http.call("PUT", "/v1/me/follows/m3", "eve"))[0] == 200


async def test_follow_refusals(server: Running) -> None:
    http = Http(server)
    await server.client("m1", "model")
    await server.client("bob")
    status, reply = await http.call("PUT", "/v1/me/follows/m1")
    assert status == 401, reply
    status, reply = await http.call("PUT", "/v1/me/follows/nobody", "bob")
    assert status == 404 and reply["error"]["code"] == "NOT_FOUND"
    status, reply = await http.call("PUT", "/v1/me/follows/bob", "m1", "model")
    assert status == 404  # bob is a fan, not a model
    status, reply = await http.call("PUT", "/v1/me/follows/m1", "m1", "model")
    assert status == 400 and reply["error"]["code"] == "BAD_REQUEST"
    status, reply = await http.call("GET", "/v1/me/follows?cursor=a%20b", "bob")
    assert status == 400
    status, reply = await http.call("GET", "/v1/me/notifications?limit=1000", "bob")
    assert status == 400
    status, reply = await http.call("GET", "/v1/me/notifications?cursor=" + "9" * 19, "bob")
    assert status == 400
    status, reply = await http.call("GET", "/v1/me/notifications?cursor=123456789012", "bob")
    assert status == 200 and reply["notifications"] == []  # ids grow past 9 digits
    assert await pg(server.node.settings, "SELECT * FROM follows") == []


async def add_followers(settings: Settings, n: int) -> None:
    """Fans f1..fn following alice, written straight to Postgres."""
    await pg(
        settings,
        "INSERT INTO users (id, role) SELECT 'f' || g, 'fan' FROM generate_series(1, $1::int) g",
        n,
    )
    await pg(
        settings,
        """INSERT INTO follows (follower, model)
           SELECT 'f' || g, 'alice' FROM generate_series(1, $1::int) g""",
        n,
    )


async def notes(server: Running, user: str, query: str = "") -> list[dict[str, Any]]:
    status, reply = await Http(server).call("GET", f"/v1/me/notifications{query}", user)
    assert status == 200, reply
    return list(reply["notifications"])


async def test_live_event_to_connected_and_stored_for_all(server: Running) -> None:
    http = Http(server)
    alice = await server.client("alice", "model")
    online = await server.client("online")
    await server.client("offline")
    await server.client("stranger")
    for fan in ("online", "offline"):
        assert (await http.call("PUT", "/v1/me/follows/alice", fan))[0] == 200
    # 20 more followers than one batch holds (7): several batches, one job.
    await add_followers(server.node.settings, 20)
    stranger = await server.client("stranger2")
    await alice.call("join", room="alice")
    event = await online.next_event("live")
    assert event["model"] == "alice" and isinstance(event["ts"], int)

    async def stored() -> bool:
        rows = await pg(server.node.settings, "SELECT count(*) AS n FROM notifications")
        return bool(rows[0]["n"] == 22)

    await eventually(stored)
    got = await notes(server, "offline")
    assert [(n["kind"], n["model"], n["ts"]) for n in got] == [("live", "alice", event["ts"])]
    assert await notes(server, "stranger") == []
    with pytest.raises(asyncio.TimeoutError):
        await stranger.next_event("live", timeout_s=0.3)
    # A flapping connection inside live_away_s notifies no one again.
    await alice.call("leave", room="alice")
    await alice.call("join", room="alice")
    with pytest.raises(asyncio.TimeoutError):
        await online.next_event("live", timeout_s=0.2)
    # A second tab while she is in her room: nothing either.
    tab = await server.client("alice", "model")
    await tab.call("join", room="alice")
    with pytest.raises(asyncio.TimeoutError):
        await online.next_event("live", timeout_s=0.2)
    # Away for longer than live_away_s (both tabs gone): live again.
    await tab.close()
    await alice.close()
    await asyncio.sleep(0.4)
    again = await server.client("alice", "model")
    await again.call("join", room="alice")
    assert (await online.next_event("live"))["ts"] > event["ts"]
    await eventually(lambda: _count(server, 44))
    first = await notes(server, "offline", "?limit=1")
    assert len(first) == 1
    status, page = await http.call("GET", "/v1/me/notifications?limit=1", "offline")
    assert status == 200
    older = await notes(server, "offline", f"?limit=1&cursor={page['next_cursor']}")
    assert older[0]["ts"] == event["ts"] and first[0]["ts"] > event["ts"]


async def _count(server: Running, n: int) -> bool:
    rows = await pg(server.node.settings, "SELECT count(*) AS n FROM notifications")
    return bool(rows[0]["n"] == n)


async def test_a_job_a_dead_node_left_is_resumed(server: Running) -> None:
    """The cursor says 'f3' was done: another node's sweep stores the rest."""
    settings: Settings = server.node.settings
    await server.client("alice", "model")
    await add_followers(settings, 9)
    await pg(
        settings,
        """INSERT INTO live_jobs (model, ts_ms, cursor, lease_until)
           VALUES ('alice', 123, 'f3', now() - interval '1 second')""",
    )
    await eventually(lambda: _count(server, 6))
    rows = await pg(settings, "SELECT user_id FROM notifications ORDER BY user_id")
    assert [r["user_id"] for r in rows] == ["f4", "f5", "f6", "f7", "f8", "f9"]
    assert (await pg(settings, "SELECT done FROM live_jobs"))[0]["done"] is True


async def test_malformed_live_payload_is_dropped(server: Running, redis: Any) -> None:
    fan = await server.client("fan")
    await redis.publish(server.node.discovery.channel, b'L{"nomodel": 1}')
    await redis.publish(server.node.discovery.channel, b"Lnot json")
    with pytest.raises(asyncio.TimeoutError):
        await fan.next_event("live", timeout_s=0.2)
    assert await fan.call("ping") is not None


async def test_notifications_survive_a_restart(start_server: Any) -> None:
    first = await start_server(live_away_s=0.3)
    await first.client("bob")
    alice = await first.client("alice", "model")
    await Http(first).call("PUT", "/v1/me/follows/alice", "bob")
    await alice.call("join", room="alice")
    await eventually(lambda: _count(first, 1))
    await alice.close()
    await first.process.stop()
    second = await start_server(live_away_s=0.3)
    got = await notes(second, "bob")
    assert [n["model"] for n in got] == ["alice"]


async def test_client_library_calls(server: Running) -> None:
    """client_demo.client: put_profile, model_profile, rooms, follow, follows,
    notifications, and HttpError on a refusal."""
    from tests.conftest import token
    from tokenchat.client_demo import client

    await server.client("alice", "model")
    await server.client("bob")
    base = server.http_url
    saved = await client.put_profile(
        base, token("alice", "model"), display_name="Alice", bio="hi", tags=["jazz"]
    )
    assert saved["tags"] == ["jazz"]
    got = await client.model_profile(base, "alice")
    assert got["display_name"] == "Alice" and "prices" in got and got["menu"] == []
    page = await client.rooms(base, sort="new", tag="jazz", limit=5)
    assert [r["id"] for r in page["rooms"]] == ["alice"] and page["next_cursor"] is None
    await client.follow(base, token("bob"), "alice")
    assert [f["model"] for f in (await client.follows(base, token("bob")))["follows"]] == ["alice"]
    await client.follow(base, token("bob"), "alice", on=False)
    assert (await client.follows(base, token("bob")))["follows"] == []
    assert (await client.notifications(base, token("bob"), limit=5))["notifications"] == []
    with pytest.raises(client.HttpError) as refused:
        await client.model_profile(base, "bob")
    assert refused.value.status == 404
