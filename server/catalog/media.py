"""Locked media: what a model sells, where its bytes live, who may fetch them.

- ``MediaStore`` is the storage interface (put, ranged read, size, delete),
  so an object store can replace ``LocalDiskStore`` (the development
  default): ranged reads are what both a disk and S3-like stores offer.
- ``sniff`` names an upload's type from its first bytes (magic numbers),
  never from the client's Content-Type or file name.
- ``MediaCatalog`` keeps the ``media`` rows (Postgres) and their cache in
  Redis (``Keys.media``, in the money slot: the unlock script reads the price
  there), makes previews, and signs the short-lived content URLs.

Who may read content is the economy's business (``Economy.entitled``: the
owner and the fans who unlocked it); a signed URL only proves that the
server said yes within the last ``media_url_ttl_s`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import io
import os
import re
import secrets
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import asyncpg
from redis.asyncio import Redis
from redis.exceptions import RedisError

from ..config import Settings
from ..errors import BadRequest, Forbidden, NotFound, Unavailable
from ..keys import Keys

MEDIA_ID_PREFIX = "m_"
# 16 random bytes: ids nobody can guess or enumerate (URL-safe base64, 22 characters).
MEDIA_ID_BYTES = 16
# Bytes ``sniff`` needs: the longest signature checked (an ISO-BMFF `ftyp`
# box's brand at bytes 8-11; WebP's at 8-11).
SNIFF_BYTES = 16
# A preview text: a one-line teaser beside a locked card.
PREVIEW_TEXT_LEN_MAX = 255  # characters
# The public thumbnail: small enough to load instantly in a chat, blurred
# enough that it does not give the picture away.
THUMBNAIL_SIZE_PX = 320  # longest side
THUMBNAIL_BLUR_RADIUS_PX = 12
THUMBNAIL_JPEG_QUALITY = 70
PREVIEW_CONTENT_TYPE = "image/jpeg"
# Bytes read from the store per chunk of a response: large enough that a
# video streams in few reads, small enough to keep a response's memory low.
READ_CHUNK_BYTES = 256 * 1024
# Store names: a media id and an optional suffix, nothing that walks a path.
_STORE_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,80}(\.[a-z]{1,10})?\Z")
_SIG_RE = re.compile(r"^[0-9a-f]{64}\Z")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
# Domain separation: the URL key is derived from the server's secret, and
# can sign nothing but media URLs (never a token).
_URL_KEY_LABEL = b"tokenchat media url v1"

_DB_ERRORS = (asyncpg.PostgresError, OSError, asyncio.TimeoutError)
_REDIS_ERRORS = (RedisError, OSError)


# --- storage -----------------------------------------------------------------------------


class MediaStore(Protocol):
    """Where media bytes live. Names are ``[A-Za-z0-9_-]`` plus an optional
    suffix; ``put`` replaces. Every call may raise ``Unavailable``."""

    async def put(self, name: str, source: BinaryIO) -> None:
        """Store what ``source`` holds from its current position to its end."""

    async def read(self, name: str, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes from ``offset`` (a ranged GET on an object store)."""

    async def size(self, name: str) -> int:
        """The stored object's size in bytes; ``NotFound`` if there is none."""

    async def delete(self, name: str) -> None:
        """Remove it; a missing object is not an error."""


class LocalDiskStore:
    """Objects as files under one folder (development and one-box installs).

    Files are written to a temporary name and renamed, so a reader never
    sees half an object; the blocking calls run in a worker thread.
    """

    def __init__(self, root: Path) -> None:
        self._root = root

    def _path(self, name: str) -> Path:
        if not _STORE_NAME_RE.fullmatch(name):
            raise ValueError(f"not a store name: {name!r}")  # a programmer error
        return self._root / name

    async def put(self, name: str, source: BinaryIO) -> None:
        path = self._path(name)

        def write() -> None:
            self._root.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f".{path.name}.{secrets.token_hex(4)}.partial")
            try:
                with partial.open("wb") as out:
                    shutil.copyfileobj(source, out, READ_CHUNK_BYTES)
                os.replace(partial, path)
            finally:
                partial.unlink(missing_ok=True)

        try:
            await asyncio.to_thread(write)
        except OSError as exc:
            raise Unavailable("the media store cannot write") from exc

    async def read(self, name: str, offset: int, length: int) -> bytes:
        path = self._path(name)

        def read() -> bytes:
            with path.open("rb") as file:
                file.seek(offset)
                return file.read(length)

        try:
            return await asyncio.to_thread(read)
        except FileNotFoundError:
            raise NotFound("the media's content is gone") from None
        except OSError as exc:
            raise Unavailable("the media store cannot read") from exc

    async def size(self, name: str) -> int:
        try:
            return (await asyncio.to_thread(self._path(name).stat)).st_size
        except FileNotFoundError:
            raise NotFound("the media's content is gone") from None
        except OSError as exc:
            raise Unavailable("the media store cannot read") from exc

    async def delete(self, name: str) -> None:
        try:
            await asyncio.to_thread(self._path(name).unlink, missing_ok=True)
        except OSError as exc:
            raise Unavailable("the media store cannot delete") from exc


async def read_range(store: MediaStore, name: str, start: int, end: int) -> AsyncIterator[bytes]:
    """Bytes ``start``..``end`` (inclusive) of an object, in chunks."""
    position = start
    while position <= end:
        chunk = await store.read(name, position, min(READ_CHUNK_BYTES, end - position + 1))
        if not chunk:  # the object shrank: end the body rather than loop
            return
        position += len(chunk)
        yield chunk


def content_name(media_id: str) -> str:
    return media_id


def preview_name(media_id: str) -> str:
    return f"{media_id}.jpg"


# --- sniffing ------------------------------------------------------------------------------


def sniff(head: bytes) -> tuple[str, str] | None:
    """(kind, content type) from an upload's first ``SNIFF_BYTES`` bytes, or
    None for anything that is not a photo or video format served here.

    Signatures: JPEG FF D8 FF; PNG's 8-byte signature; GIF87a/GIF89a; WebP
    (RIFF....WEBP); ISO-BMFF (MP4, MOV: a box whose type at bytes 4-7 is
    `ftyp`, brand `qt  ` for QuickTime); WebM/Matroska (EBML header 1A 45 DF A3).
    """
    if head.startswith(b"\xff\xd8\xff"):
        return "image", "image/jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image", "image/png"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "image", "image/gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image", "image/webp"
    if head[4:8] == b"ftyp":
        return "video", "video/quicktime" if head[8:12] == b"qt  " else "video/mp4"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "video", "video/webm"
    return None


def _decoded(source: BinaryIO, pixels_max: int) -> Any:
    """The picture in ``source``, fully decoded, or BadRequest. Pillow's own
    bomb guard is replaced by the configured pixel bound, checked before
    decoding from the header."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(source)
        width, height = image.size
        if width * height > pixels_max:
            raise BadRequest(f"the picture is over {pixels_max} pixels")
        image.load()
    except BadRequest:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise BadRequest(f"the picture does not decode: {type(exc).__name__}") from None
    except Image.DecompressionBombError:
        raise BadRequest(f"the picture is over {pixels_max} pixels") from None
    return image


def thumbnail_jpeg(source: BinaryIO, pixels_max: int, *, blur: bool) -> bytes:
    """A small JPEG of the picture in ``source`` (blurred: a locked photo's
    preview). Re-encoding also drops whatever metadata the upload carried."""
    from PIL import Image, ImageFilter

    image = _decoded(source, pixels_max)
    image = image.convert("RGB")
    image.thumbnail((THUMBNAIL_SIZE_PX, THUMBNAIL_SIZE_PX), Image.Resampling.LANCZOS)
    if blur:
        image = image.filter(ImageFilter.GaussianBlur(THUMBNAIL_BLUR_RADIUS_PX))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=THUMBNAIL_JPEG_QUALITY)
    return out.getvalue()


# --- the catalog ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MediaInfo:
    id: str
    owner: str
    kind: str  # image | video
    content_type: str
    size_bytes: int
    price: int
    preview_text: str | None
    preview_image: bool

    def preview(self) -> dict[str, Any]:
        """The public preview: the thumbnail's path, or the text."""
        if self.preview_image:
            return {"kind": "image", "url": f"/v1/media/{self.id}/preview"}
        return {"kind": "text", "text": self.preview_text or ""}

    def descriptor(self) -> dict[str, Any]:
        """What events and replies carry: never the content or its URL."""
        return {"id": self.id, "kind": self.kind, "price": self.price, "preview": self.preview()}


@dataclass(frozen=True, slots=True)
class Upload:
    """An uploaded file as the HTTP layer received it (spooled by Starlette)."""

    file: BinaryIO
    size_bytes: int


def _info_from_row(row: Any) -> MediaInfo:
    return MediaInfo(
        row["id"],
        row["owner_id"],
        row["kind"],
        row["content_type"],
        row["size_bytes"],
        row["price"],
        row["preview_text"],
        row["preview_image"],
    )


def _info_from_hash(media_id: str, cached: Any) -> MediaInfo:
    text = cached.get(b"ptext")
    return MediaInfo(
        media_id,
        cached[b"owner"].decode(),
        cached[b"kind"].decode(),
        cached[b"ct"].decode(),
        int(cached[b"size"]),
        int(cached[b"price"]),
        None if text is None else text.decode(),
        cached[b"pimg"] == b"1",
    )


class MediaCatalog:
    def __init__(
        self, pool: asyncpg.Pool, redis: Redis, keys: Keys, store: MediaStore, settings: Settings
    ) -> None:
        self._pool = pool
        self._redis = redis
        self._keys = keys
        self.store = store
        self._settings = settings
        self._url_key = hmac.new(settings.jwt_secret.encode(), _URL_KEY_LABEL, "sha256").digest()

    # --- reads ----------------------------------------------------------------------
    async def info(self, media_id: str) -> MediaInfo:
        """The media, from the Redis cache or Postgres; NotFound for an id of
        another kind or of nothing."""
        if not media_id.startswith(MEDIA_ID_PREFIX):
            raise NotFound(f"no media '{media_id}'")
        for _ in range(2):
            try:
                cached = await self._redis.hgetall(self._keys.media(media_id))  # type: ignore[misc]
            except _REDIS_ERRORS as exc:
                raise Unavailable("media are unavailable") from exc
            # A price update may have created the hash with its price alone.
            if b"owner" in cached:
                return _info_from_hash(media_id, cached)
            await self.load(media_id)
        raise Unavailable("media could not be loaded")

    async def load(self, media_id: str) -> None:
        """Cache the media's row in Redis (NotFound if there is none).

        Field by field with HSETNX: a price update that raced this load (and
        HSET its price) wins over the older price read here; the other
        fields never change.
        """
        if not media_id.startswith(MEDIA_ID_PREFIX):
            raise NotFound(f"no media '{media_id}'")
        try:
            row = await self._pool.fetchrow("SELECT * FROM media WHERE id = $1", media_id)
        except _DB_ERRORS as exc:
            raise Unavailable("media are unavailable") from exc
        if row is None:
            raise NotFound(f"no media '{media_id}'")
        info = _info_from_row(row)
        fields: dict[str, Any] = {
            "owner": info.owner,
            "kind": info.kind,
            "ct": info.content_type,
            "size": info.size_bytes,
            "price": info.price,
            "pimg": int(info.preview_image),
        }
        if info.preview_text is not None:
            fields["ptext"] = info.preview_text
        key = self._keys.media(media_id)
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                for name, value in fields.items():
                    pipe.hsetnx(key, name, value)
                await pipe.execute()
        except _REDIS_ERRORS as exc:
            raise Unavailable("media are unavailable") from exc

    # --- writes ---------------------------------------------------------------------
    async def create(
        self,
        owner: str,
        content: Upload,
        price: int,
        preview_text: str | None,
        preview_image: Upload | None,
    ) -> MediaInfo:
        """Sniff, check, store and record an upload; BadRequest for anything
        that is not a photo or video within its limits."""
        settings = self._settings
        content.file.seek(0)
        head = content.file.read(SNIFF_BYTES)
        content.file.seek(0)
        sniffed = sniff(head)
        if sniffed is None:
            raise BadRequest("the file is not a photo (JPEG, PNG, GIF, WebP) or video (MP4, WebM)")
        kind, content_type = sniffed
        size_max = (
            settings.media_image_bytes_max if kind == "image" else settings.media_video_bytes_max
        )
        if content.size_bytes > size_max:
            raise BadRequest(f"a {kind} may be at most {size_max} bytes")
        if preview_text is not None and len(preview_text) > PREVIEW_TEXT_LEN_MAX:
            raise BadRequest(f"the preview text may be at most {PREVIEW_TEXT_LEN_MAX} characters")
        if preview_text is not None and _CONTROL_RE.search(preview_text):
            # Postgres refuses NUL in text; the other controls would forge
            # lines wherever the teaser is shown.
            raise BadRequest("the preview text may not hold control characters")
        thumbnail = await self._preview_of(kind, content, preview_text, preview_image)
        media_id = MEDIA_ID_PREFIX + secrets.token_urlsafe(MEDIA_ID_BYTES)
        info = MediaInfo(
            media_id,
            owner,
            kind,
            content_type,
            content.size_bytes,
            price,
            preview_text,
            thumbnail is not None,
        )
        await self.store.put(content_name(media_id), content.file)
        try:
            if thumbnail is not None:
                await self.store.put(preview_name(media_id), io.BytesIO(thumbnail))
            await self._insert(info)
        except BaseException:
            # No row names these objects: they would never be served or removed.
            await self.store.delete(content_name(media_id))
            await self.store.delete(preview_name(media_id))
            raise
        return info

    async def _preview_of(
        self, kind: str, content: Upload, preview_text: str | None, preview: Upload | None
    ) -> bytes | None:
        """The thumbnail to store (None: the preview is the text alone).

        A photo is always decoded (that is what proves it is one); its
        blurred thumbnail is the preview unless the model gave a text. A
        video is not decoded (no transcoding here): its preview is the image
        or the text the model uploaded with it.
        """
        pixels_max = self._settings.media_image_pixels_max
        blurred = None
        if kind == "image":
            blurred = await asyncio.to_thread(thumbnail_jpeg, content.file, pixels_max, blur=True)
            content.file.seek(0)
        if preview is not None:
            if preview.size_bytes > self._settings.media_preview_bytes_max:
                raise BadRequest(
                    f"a preview image may be at most {self._settings.media_preview_bytes_max} bytes"
                )
            preview.file.seek(0)
            sniffed = sniff(preview.file.read(SNIFF_BYTES))
            preview.file.seek(0)
            if sniffed is None or sniffed[0] != "image":
                raise BadRequest("the preview must be a photo (JPEG, PNG, GIF, WebP)")
            return await asyncio.to_thread(thumbnail_jpeg, preview.file, pixels_max, blur=False)
        if preview_text is not None:
            return None
        if blurred is None:
            raise BadRequest("a video needs a preview: an image ('preview') or a 'preview_text'")
        return blurred

    async def _insert(self, info: MediaInfo) -> None:
        try:
            await self._pool.execute(
                """INSERT INTO media (id, owner_id, kind, content_type, size_bytes, price,
                                      preview_text, preview_image)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8)""",
                info.id,
                info.owner,
                info.kind,
                info.content_type,
                info.size_bytes,
                info.price,
                info.preview_text,
                info.preview_image,
            )
        except _DB_ERRORS as exc:
            raise Unavailable("media are unavailable; nothing was stored") from exc

    async def set_price(self, owner: str, media_id: str, price: int) -> MediaInfo:
        """The owner's new price: Postgres first, then the cache the unlock
        script reads (HSET, which wins over a racing load's HSETNX)."""
        info = await self.info(media_id)
        if info.owner != owner:
            raise Forbidden("only the media's owner may price it")
        try:
            await self._pool.execute("UPDATE media SET price = $2 WHERE id = $1", media_id, price)
        except _DB_ERRORS as exc:
            raise Unavailable("media are unavailable") from exc
        try:
            await self._redis.hset(self._keys.media(media_id), "price", price)  # type: ignore[misc]
        except _REDIS_ERRORS as exc:
            # Postgres has the new price; the cache must not keep the old one.
            with contextlib.suppress(*_REDIS_ERRORS):
                await self._redis.delete(self._keys.media(media_id))
            raise Unavailable("the price was saved but the cache is unavailable") from exc
        return MediaInfo(
            info.id,
            info.owner,
            info.kind,
            info.content_type,
            info.size_bytes,
            price,
            info.preview_text,
            info.preview_image,
        )

    # --- signed URLs ---------------------------------------------------------------------
    def _signature(self, media_id: str, expires_ms: int) -> str:
        message = f"{media_id}\n{expires_ms}".encode()
        return hmac.new(self._url_key, message, hashlib.sha256).hexdigest()

    def signed_url(self, media_id: str, now_ms: int | None = None) -> dict[str, Any]:
        """``{url, expires_at}``: a path on the HTTP API that serves the
        content until ``expires_at`` (ms since the epoch), to whoever holds it."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        expires_ms = now_ms + self._settings.media_url_ttl_s * 1000
        signature = self._signature(media_id, expires_ms)
        url = f"/v1/media/{media_id}/content?exp={expires_ms}&sig={signature}"
        return {"url": url, "expires_at": expires_ms}

    def check_signature(self, media_id: str, expires: str, signature: str) -> None:
        """Forbidden unless the URL was signed here and has not expired."""
        if not (expires.isascii() and expires.isdigit() and len(expires) <= 16):
            raise Forbidden("this media URL is not valid")
        expires_ms = int(expires)
        now_ms = int(time.time() * 1000)
        valid = _SIG_RE.fullmatch(signature) is not None and hmac.compare_digest(
            signature, self._signature(media_id, expires_ms)
        )
        if not valid:
            raise Forbidden("this media URL is not valid")
        if expires_ms <= now_ms:
            raise Forbidden("this media URL has expired: ask for a new one")
