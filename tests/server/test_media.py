"""Locked media: uploads (sniffed, bounded), previews, signed URLs with Range,
post_media and DMs with media, and unlock (idempotent, `already` checked in
Lua, durable across a Redis loss, revoked by a refund), against the real
Redis and Postgres."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.conftest import Http, Running, pg, token
from tokenchat.client_demo.client import Client
from tokenchat.server.config import Settings

# A video's first bytes: an ISO-BMFF `ftyp` box (brand isom), then filler.
MP4_BYTES = b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2" + os.urandom(4000)


def png_bytes(
    width: int = 64, height: int = 48, color: tuple[int, int, int] = (200, 30, 90)
) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), color).save(out, "PNG")
    return out.getvalue()


@pytest.fixture
async def http(server: Running) -> Http:
    return Http(server)


async def upload(
    running: Running,
    data: bytes,
    *,
    sub: str = "alice",
    role: str = "model",
    filename: str = "photo.png",
    content_type: str = "image/png",
    price: Any = 5,
    preview: bytes | None = None,
    preview_text: str | None = None,
) -> tuple[int, Any]:
    files: dict[str, Any] = {"file": (filename, data, content_type)}
    if preview is not None:
        files["preview"] = ("preview.png", preview, "image/png")
    form: dict[str, str] = {}
    if price is not None:
        form["price"] = str(price)
    if preview_text is not None:
        form["preview_text"] = preview_text
    async with httpx.AsyncClient(base_url=running.http_url, timeout=30) as client:
        response = await client.post(
            "/v1/media",
            headers={"Authorization": f"Bearer {token(sub, role)}"},
            files=files,
            data=form,
        )
    return response.status_code, response.json()


async def uploaded(running: Running, price: int = 5, **kwargs: Any) -> dict[str, Any]:
    status, body = await upload(running, png_bytes(), price=price, **kwargs)
    assert status == 200, body
    return dict(body["media"])


async def get(
    running: Running, path: str, sub: str | None = None, **headers: str
) -> httpx.Response:
    if sub is not None:
        headers["Authorization"] = f"Bearer {token(sub)}"
    async with httpx.AsyncClient(base_url=running.http_url, timeout=30) as client:
        return await client.get(path, headers=headers)


async def fan_with(server: Running, http: Http, tokens: int, name: str = "bob") -> Client:
    fan = await server.client(name)
    if tokens:
        await http.credit(name, tokens)
        assert (await fan.next_event("balance"))["balance"] == tokens
    return fan


# --- uploads -----------------------------------------------------------------------------


async def test_the_type_is_sniffed_from_the_bytes_and_previews_are_public(
    server: Running,
) -> None:
    # A PNG named .mp4 and sent as video/mp4 is a PNG.
    status, body = await upload(server, png_bytes(), filename="clip.mp4", content_type="video/mp4")
    assert status == 200, body
    media = body["media"]
    assert media["id"].startswith("m_") and media["kind"] == "image" and media["price"] == 5
    assert media["preview"] == {"kind": "image", "url": f"/v1/media/{media['id']}/preview"}
    preview = await get(server, media["preview"]["url"])  # no token: previews are public
    assert preview.status_code == 200 and preview.headers["content-type"] == "image/jpeg"
    thumbnail = Image.open(io.BytesIO(preview.content))
    assert thumbnail.format == "JPEG" and max(thumbnail.size) <= 320
    # The public descriptor, without the content.
    described = await get(server, f"/v1/media/{media['id']}")
    assert described.json() == {"media": media, "owner": "alice"}

    # A video (no transcoding): its preview is the text or image the model gave.
    status, body = await upload(
        server, MP4_BYTES, filename="x.png", content_type="image/png", preview_text="teaser"
    )
    assert status == 200, body
    assert body["media"]["kind"] == "video"
    assert body["media"]["preview"] == {"kind": "text", "text": "teaser"}
    status, body = await upload(server, MP4_BYTES, filename="v.mp4", preview=png_bytes(900, 600))
    assert status == 200 and body["media"]["preview"]["kind"] == "image", body
    small = await get(server, body["media"]["preview"]["url"])
    assert max(Image.open(io.BytesIO(small.content)).size) <= 320


@pytest.mark.parametrize(
    ("data", "fields", "message"),
    [
        (os.urandom(2000), {}, "not a photo"),  # garbage
        (b"\x89PNG\r\n\x1a\n" + os.urandom(2000), {}, "does not decode"),  # a PNG's header only
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", {}, "not a photo"),
        (MP4_BYTES, {}, "needs a preview"),  # a video without a preview
        (MP4_BYTES, {"preview": MP4_BYTES}, "preview must be a photo"),
        (png_bytes(), {"price": None}, "price"),
        (png_bytes(), {"price": 0}, "price"),
        (png_bytes(), {"price": "1e3"}, "price"),
        (png_bytes(), {"price": 1_000_001}, "price"),
        (png_bytes(), {"preview_text": "x" * 256}, "preview text"),
        (png_bytes(), {"preview_text": "nul\x00byte"}, "control characters"),
    ],
)
async def test_uploads_that_are_not_media_within_limits_are_refused(
    server: Running, settings: Settings, data: bytes, fields: dict[str, Any], message: str
) -> None:
    status, body = await upload(server, data, **fields)
    assert status == 400 and body["error"]["code"] == "BAD_REQUEST", body
    assert message in body["error"]["message"]
    assert (await pg(settings, "SELECT count(*) AS n FROM media"))[0]["n"] == 0
    # Nothing stored either: the folder holds no object.
    assert not list(Path(settings.media_dir).glob("*"))  # noqa: ASYNC240 - a test's check


async def test_size_limits_are_per_kind_and_only_models_upload(
    start_server: Any,
) -> None:
    running = await start_server(media_image_bytes_max=1000, media_image_pixels_max=10_000)
    noise = io.BytesIO()  # 3,600 pixels of noise: over 1000 bytes as a PNG
    Image.frombytes("RGB", (60, 60), os.urandom(60 * 60 * 3)).save(noise, "PNG")
    status, body = await upload(running, noise.getvalue())
    assert status == 400 and "at most 1000 bytes" in body["error"]["message"], body
    tiny_but_huge = png_bytes(200, 200)  # compresses under 1000 bytes, 40,000 pixels
    assert len(tiny_but_huge) < 1000
    status, body = await upload(running, tiny_but_huge)
    assert status == 400 and "pixels" in body["error"]["message"], body
    status, body = await upload(running, png_bytes(20, 20), role="fan", sub="bob")
    assert status == 403 and body["error"]["code"] == "FORBIDDEN"
    status, body = await upload(running, png_bytes(20, 20))
    assert status == 200, body
    async with httpx.AsyncClient(base_url=running.http_url) as client:
        anonymous = await client.post("/v1/media", files={"file": ("a.png", png_bytes(20, 20))})
        assert anonymous.status_code == 401
        as_json = await client.post(
            "/v1/media",
            headers={"Authorization": f"Bearer {token('alice', 'model')}"},
            json={"file": "x"},
        )
        assert as_json.status_code == 400 and as_json.json()["error"]["code"] == "BAD_REQUEST"


async def raw_post(running: Running, headers: dict[str, str], length: str) -> int:
    """POST /v1/media with this Content-Length and no body; the status."""
    import asyncio

    host, port = running.http_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    lines = [
        "POST /v1/media HTTP/1.1",
        f"Host: {host}",
        f"Authorization: {headers['Authorization']}",
        "Content-Type: multipart/form-data; boundary=x",
        f"Content-Length: {length}",
        "Connection: close",
    ]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    await writer.drain()
    status_line = await reader.readline()
    writer.close()
    return int(status_line.split()[1])


async def test_hostile_uploads_are_bad_requests(server: Running, settings: Settings) -> None:
    auth = {"Authorization": f"Bearer {token('alice', 'model')}"}
    picture = png_bytes()

    async def chunks() -> Any:
        yield b"--x\r\n"

    async with httpx.AsyncClient(base_url=server.http_url, timeout=30) as client:
        # No Content-Length (chunked): the size cannot be checked first.
        chunked = await client.post(
            "/v1/media",
            headers={**auth, "Content-Type": "multipart/form-data; boundary=x"},
            content=chunks(),
        )
        assert chunked.status_code == 400 and "Content-Length" in chunked.text
        # Lengths httpx would not send: raw requests, each answered 400.
        for length in ("9" * 5000, "-1", "1e9", str(2**40)):
            status = await raw_post(server, auth, length)
            assert status == 400, length
        three_files = await client.post(
            "/v1/media",
            headers=auth,
            files=[
                ("file", ("a.png", picture)),
                ("preview", ("b.png", picture)),
                ("x", ("c", b"c")),
            ],
            data={"price": "5"},
        )
        assert three_files.status_code == 400, three_files.text
        assert three_files.json()["error"]["code"] == "BAD_REQUEST"
        text_as_file = await client.post(
            "/v1/media",
            headers=auth,
            files={"preview": ("p.png", picture)},
            data={"file": "not a file", "price": "5"},
        )
        assert text_as_file.status_code == 400 and "'file'" in text_as_file.text
        huge_field = await client.post(
            "/v1/media",
            headers=auth,
            files={"file": ("a.png", picture)},
            data={"price": "5", "preview_text": "x" * 10_000},
        )
        assert huge_field.status_code == 400
    assert (await pg(settings, "SELECT count(*) AS n FROM media"))[0]["n"] == 0


# --- signed URLs ---------------------------------------------------------------------------


async def test_content_is_served_to_its_owner_and_unlockers_only(
    server: Running, http: Http
) -> None:
    data = png_bytes(50, 50)
    status, body = await upload(server, data, price=3)
    assert status == 200
    media_id = body["media"]["id"]
    refused = await get(server, f"/v1/media/{media_id}/url", "bob")
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "FORBIDDEN"
    unsigned = await get(server, f"/v1/media/{media_id}/content")
    assert unsigned.status_code == 403

    owner = await get(server, f"/v1/media/{media_id}/url", "alice")
    assert owner.status_code == 200
    signed = owner.json()
    now_ms = time.time() * 1000
    assert now_ms < signed["expires_at"] <= now_ms + 300_000
    content = await get(server, signed["url"])
    assert content.status_code == 200 and content.content == data
    assert content.headers["content-type"] == "image/png"

    fan = await fan_with(server, http, 10)
    reply = await fan.call("unlock", media=media_id, key="u1")
    assert (reply["balance"], reply["price"]) == (7, 3)
    assert (await get(server, reply["url"])).content == data
    assert (await get(server, f"/v1/media/{media_id}/url", "bob")).status_code == 200
    # Wrong kinds of ids are simply not found.
    for wrong in ("t_" + media_id[2:], "m_nothing", "alice"):
        missing = await get(server, f"/v1/media/{wrong}/url", "bob")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "NOT_FOUND"
    await fan.close()


async def test_forged_and_expired_urls_are_refused(server: Running) -> None:
    media = await uploaded(server)
    media_id = media["id"]
    catalog = server.node.media
    good = catalog.signed_url(media_id)["url"]
    assert (await get(server, good)).status_code == 200
    path, _, query = good.partition("?")
    fields = dict(part.split("=") for part in query.split("&"))
    sig, exp = fields["sig"], fields["exp"]
    other = await uploaded(server)
    forged = [
        f"{path}?exp={exp}&sig={'0' * 64}",
        f"{path}?exp={int(exp) + 60_000}&sig={sig}",  # a later expiry, same signature
        f"/v1/media/{other['id']}/content?exp={exp}&sig={sig}",  # another media's
        f"{path}?exp={exp}",
        f"{path}?exp=abc&sig={sig}",
        f"{path}?exp={exp}&sig={sig.upper()}",
    ]
    for url in forged:
        response = await get(server, url)
        assert response.status_code == 403, url
        assert response.json()["error"]["code"] == "FORBIDDEN"
    expired = catalog.signed_url(media_id, now_ms=int(time.time() * 1000) - 301_000)
    response = await get(server, expired["url"])
    assert response.status_code == 403 and "expired" in response.json()["error"]["message"]


async def test_range_requests_get_206(server: Running) -> None:
    status, body = await upload(server, MP4_BYTES, filename="v.mp4", preview_text="p")
    assert status == 200
    url = server.node.media.signed_url(body["media"]["id"])["url"]
    size = len(MP4_BYTES)
    whole = await get(server, url)
    assert whole.status_code == 200 and whole.content == MP4_BYTES
    assert whole.headers["accept-ranges"] == "bytes"
    assert whole.headers["content-type"] == "video/mp4"
    first = await get(server, url, Range="bytes=0-99")
    assert first.status_code == 206 and first.content == MP4_BYTES[:100]
    assert first.headers["content-range"] == f"bytes 0-99/{size}"
    middle = await get(server, url, Range="bytes=1000-")
    assert middle.status_code == 206 and middle.content == MP4_BYTES[1000:]
    suffix = await get(server, url, Range="bytes=-10")
    assert suffix.status_code == 206 and suffix.content == MP4_BYTES[-10:]
    past = await get(server, url, Range=f"bytes={size}-")
    assert past.status_code == 416 and past.headers["content-range"] == f"bytes */{size}"
    several = await get(server, url, Range="bytes=0-1,5-6")  # not served: the whole
    assert several.status_code == 200 and several.content == MP4_BYTES


# --- unlock --------------------------------------------------------------------------------


@pytest.mark.cluster
async def test_unlock_is_idempotent_and_already_owned_media_charges_nothing(
    server: Running, http: Http, settings: Settings
) -> None:
    model = await server.client("alice", "model")
    media = await uploaded(server, price=4)
    fan = await fan_with(server, http, 10)
    first = await fan.call("unlock", media=media["id"], key="u1", max_price=4)
    assert (first["balance"], first["price"]) == (6, 4) and "already" not in first
    assert (await model.next_event("balance"))["balance"] == 4
    again = await fan.call("unlock", media=media["id"], key="u1", max_price=4)
    assert again["duplicate"] is True and again["tx"] == first["tx"] and again["balance"] == 6
    conflict = await fan.request("unlock", media=media["id"], key="u1")
    assert conflict["code"] == "CONFLICT"
    owned = await fan.call("unlock", media=media["id"], key="u2")
    assert owned["already"] is True and owned["price"] == 0 and owned["tx"] == first["tx"]
    assert owned["balance"] == 6 and owned["url"].startswith(f"/v1/media/{media['id']}/content?")
    # The owner "unlocks" her own: already hers, nothing charged.
    own = await model.call("unlock", media=media["id"], key="own")
    assert own["already"] is True and own["price"] == 0 and own["tx"] is None
    assert own["balance"] == 4
    assert (await fan.call("balance"))["balance"] == 6

    rows = await pg(
        settings,
        """SELECT t.id, t.kind, t.initiator, p.account_id, p.amount FROM ledger_transactions t
           JOIN ledger_postings p ON p.tx_id = t.id WHERE t.kind = 'unlock' ORDER BY p.amount""",
    )
    assert [(r["id"], r["initiator"], r["account_id"], r["amount"]) for r in rows] == [
        (first["tx"], "u:bob", "u:bob", -4),
        (first["tx"], "u:bob", "u:alice", 4),
    ]
    assert (await http.reconcile())["ok"] is True
    await fan.close()
    await model.close()


async def test_racing_unlocks_with_different_keys_charge_once(server: Running, http: Http) -> None:
    import asyncio

    media = await uploaded(server, price=3)
    fan = await fan_with(server, http, 10)
    other_tab = await server.client("bob")
    replies = await asyncio.gather(
        *(
            client.call("unlock", media=media["id"], key=f"race{i}")
            for i, client in enumerate([fan, other_tab] * 3)
        )
    )
    paid = [r for r in replies if not r.get("already")]
    assert len(paid) == 1 and paid[0]["price"] == 3
    assert all(r["tx"] == paid[0]["tx"] for r in replies)
    assert (await fan.call("balance"))["balance"] == 7
    await fan.close()
    await other_tab.close()


async def test_unlock_refusals_move_nothing(server: Running, http: Http) -> None:
    media = await uploaded(server, price=8)
    fan = await fan_with(server, http, 5)
    cases = [
        ({"media": media["id"], "max_price": 7}, "PRICE_CHANGED"),
        ({"media": media["id"]}, "INSUFFICIENT_FUNDS"),
        ({"media": "m_" + "x" * 22}, "NOT_FOUND"),
        ({"media": "t_" + media["id"][2:]}, "NOT_FOUND"),  # an id of another kind
        ({"media": "../etc/passwd"}, "BAD_REQUEST"),
        ({"media": 5}, "BAD_REQUEST"),
        ({"media": media["id"], "max_price": -1}, "BAD_REQUEST"),
    ]
    for fields, code in cases:
        reply = await fan.request("unlock", key="k", **fields)
        assert reply["code"] == code, (fields, reply)
    assert (await fan.request("unlock", media=media["id"]))["code"] == "BAD_REQUEST"  # no key
    assert "8" in (await fan.request("unlock", media=media["id"], key="k", max_price=1))["message"]
    assert (await fan.call("balance"))["balance"] == 5
    # The refused key is not burnt: once the fan can pay, it works.
    await http.credit("bob", 3)
    assert (await fan.call("unlock", media=media["id"], key="k"))["balance"] == 0
    await fan.close()


async def test_a_new_price_applies_and_max_price_guards_it(server: Running, http: Http) -> None:
    media = await uploaded(server, price=2)
    status, body = await http.call("PUT", f"/v1/media/{media['id']}", "alice", "model", price=9)
    assert status == 200 and body["media"]["price"] == 9
    status, body = await http.call("PUT", f"/v1/media/{media['id']}", "carol", "model", price=1)
    assert status == 403
    status, body = await http.call("PUT", f"/v1/media/{media['id']}", "alice", "model", price=0)
    assert status == 400
    fan = await fan_with(server, http, 20)
    assert (await fan.request("unlock", media=media["id"], key="a", max_price=2))[
        "code"
    ] == "PRICE_CHANGED"
    assert (await fan.call("unlock", media=media["id"], key="b", max_price=9))["price"] == 9
    await fan.close()


async def test_entitlements_come_back_from_postgres_after_redis_lost_them(
    server: Running, http: Http, redis: Any, settings: Settings
) -> None:
    media = await uploaded(server, price=4)
    fan = await fan_with(server, http, 10)
    first = await fan.call("unlock", media=media["id"], key="u1")
    assert first["balance"] == 6
    assert (await http.reconcile())["ok"] is True  # the writer has drained
    # FLUSHDB, for this test's keys only (the Redis is shared).
    keys = [key async for key in redis.scan_iter(match=f"{settings.redis_prefix}*")]
    await redis.delete(*keys)
    assert (await get(server, f"/v1/media/{media['id']}/url", "bob")).status_code == 200
    # And the unlock script sees it too: no second charge, with a new key.
    owned = await fan.call("unlock", media=media["id"], key="u2")
    assert owned["already"] is True and owned["tx"] == first["tx"] and owned["balance"] == 6
    # The first key is still a duplicate (restored with the balance).
    assert (await fan.call("unlock", media=media["id"], key="u1"))["duplicate"] is True
    assert (await http.reconcile())["ok"] is True
    await fan.close()


@pytest.mark.cluster
async def test_a_refund_revokes_the_unlock(server: Running, http: Http) -> None:
    media = await uploaded(server, price=4)
    fan = await fan_with(server, http, 10)
    first = await fan.call("unlock", media=media["id"], key="u1")
    path = f"/v1/media/{media['id']}/url"
    assert (await get(server, path, "bob")).status_code == 200
    status, refund = await http.call(
        "POST", "/v1/admin/refunds", "ops", "admin", tx=first["tx"], key="r1"
    )
    assert status == 200 and refund["balance"] == 10, refund
    assert (await get(server, path, "bob")).status_code == 403
    # A retry of the refunded unlock is its original reply, without a URL.
    retried = await fan.call("unlock", media=media["id"], key="u1")
    assert retried["duplicate"] is True and retried["url"] is None
    # Paying again buys it again (a new unlock, not "already").
    again = await fan.call("unlock", media=media["id"], key="u2")
    assert "already" not in again and again["balance"] == 6
    assert (await http.reconcile())["ok"] is True
    await fan.close()


async def test_a_refund_revokes_even_when_the_unlocks_were_not_loaded(
    server: Running, http: Http, redis: Any, settings: Settings
) -> None:
    media = await uploaded(server, price=4)
    fan = await fan_with(server, http, 10)
    first = await fan.call("unlock", media=media["id"], key="u1")
    assert (await http.reconcile())["ok"] is True
    await redis.delete(server.node.keys.entitlements("bob"))
    status, _ = await http.call(
        "POST", "/v1/admin/refunds", "ops", "admin", tx=first["tx"], key="r1"
    )
    assert status == 200
    assert (await get(server, f"/v1/media/{media['id']}/url", "bob")).status_code == 403
    await redis.delete(server.node.keys.entitlements("bob"))  # and from Postgres alone
    assert (await get(server, f"/v1/media/{media['id']}/url", "bob")).status_code == 403
    await fan.close()


# --- in rooms and DMs ------------------------------------------------------------------------


async def test_post_media_shows_the_descriptor_to_the_room(server: Running, http: Http) -> None:
    media = await uploaded(server, price=6)
    model = await server.client("alice", "model")
    fan = await server.client("bob")
    await fan.call("join", room="alice")
    binary = await server.client("erin", subprotocol="tokenchat.v1.msgpack")
    await binary.call("join", room="alice")
    reply = await model.call("post_media", room="alice", media=media["id"], text="new set")
    event = await fan.next_event("media")
    assert await binary.next_event("media") == event  # the same event in msgpack
    assert event == {
        "type": "media",
        "room": "alice",
        "from": "alice",
        "media": media,
        "text": "new set",
        "offset": reply["offset"],
        "ts": int(reply["offset"].split("-")[0]),
    }
    assert "/content" not in str(event) and "sig=" not in str(event)
    later = await server.client("carol")
    history = (await later.call("join", room="alice"))["history"]
    assert history[-1] == event
    # Only the model, in her own room, with her own media.
    other = await uploaded(server, sub="dana")
    refusals = [
        (model, {"room": "alice", "media": other["id"]}, "NOT_FOUND"),
        (model, {"room": "alice", "media": "t_abc"}, "NOT_FOUND"),
        (model, {"room": "dana", "media": media["id"]}, "FORBIDDEN"),
        (fan, {"room": "alice", "media": media["id"]}, "FORBIDDEN"),
        (model, {"room": "alice", "media": media["id"], "text": "x" * 1001}, "BAD_REQUEST"),
    ]
    for client, fields, code in refusals:
        assert (await client.request("post_media", **fields))["code"] == code, fields
    for client in (model, fan, later, binary):
        await client.close()


async def test_a_dm_carries_the_media_descriptor_never_the_content(
    server: Running, http: Http
) -> None:
    media = await uploaded(server, price=6)
    model = await server.client("alice", "model")
    fan = await server.client("bob")
    reply = await model.call("dm", to="bob", text="for you", key="d1", media=media["id"])
    event = await fan.next_event("dm")
    assert event["media"] == media and event["text"] == "for you" and event["tx"] == reply["tx"]
    other = await uploaded(server, sub="dana")
    refused = await model.request("dm", to="bob", text="x", key="d2", media=other["id"])
    assert refused["code"] == "NOT_FOUND"
    # The same key with another media is another request.
    conflict = await model.request("dm", to="bob", text="for you", key="d1")
    assert conflict["code"] == "CONFLICT"
    await model.close()
    await fan.close()


async def test_a_redis_older_than_the_ledger_forgets_no_unlock(
    start_server: Any, private_redis: str
) -> None:
    from tests.server.test_ledger_durability import rewind_outbox

    running = await start_server(redis_url=private_redis)
    http = Http(running)
    keys = running.node.keys
    media = await uploaded(running, price=4)
    fan = await fan_with(running, http, 10)
    first = await fan.call("unlock", media=media["id"], key="u1")
    assert first["balance"] == 6 and (await http.reconcile())["ok"] is True
    # Redis goes back in time (epoch unchanged): the unlock is gone from it,
    # entitlement included, but not from the ledger; its scripts too.
    redis = running.node.redis
    await redis.set(keys.balance("u:bob"), 10)
    await redis.set(keys.balance("u:alice"), 0)
    await redis.hdel(keys.entitlements("bob"), media["id"])  # type: ignore[misc]
    await redis.delete(keys.idempotency("u:bob", "u1"))
    await rewind_outbox(redis, keys)
    await redis.script_flush()
    # Rebuilt from Postgres before it takes the spend: owned, not sold twice.
    again = await fan.call("unlock", media=media["id"], key="u2")
    assert again["already"] is True and again["tx"] == first["tx"] and again["balance"] == 6
    assert (await http.reconcile())["ok"] is True
    await fan.close()
