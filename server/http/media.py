"""The HTTP side of locked media (issue #11, section 2).

=======================================  =========  =======================================
``POST /v1/media``                       model      multipart upload -> ``{media}``
``GET /v1/media/{id}``                   anyone     ``{media, owner}`` (the public descriptor)
``PUT /v1/media/{id}``                   its owner  ``{"price"}`` -> ``{media}``
``GET /v1/media/{id}/url``               owner, or  ``{url, expires_at}``: a signed URL
                                         unlocked
``GET /v1/media/{id}/content?exp&sig``   a signed   the content; Range requests answer 206
                                         URL
``GET /v1/media/{id}/preview``           anyone     the preview thumbnail (JPEG)
=======================================  =========  =======================================

Access to content is checked on every ``/url`` request (the owner, or a fan
whose unlock stands: ``Economy.entitled``); the content URL itself carries
only the server's signature and its expiry, so a ``<video>`` element can
fetch it (with Range requests) without sending a token.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from tokenchat.protocol.limits import AMOUNT_MAX, AMOUNT_MIN

from ..auth import Identity
from ..catalog.media import (
    PREVIEW_CONTENT_TYPE,
    Upload,
    content_name,
    preview_name,
    read_range,
)
from ..errors import BadRequest, Forbidden, NotFound
from ..gateway.node import Node
from .api import JSONResponse, json_body, optional_int

# Multipart framing around an upload's files and fields (boundaries, part
# headers, the price and the preview text): a few hundred bytes in practice.
MULTIPART_OVERHEAD_BYTES_MAX = 64 * 1024
# A text field of the form (price, preview_text): small; Starlette keeps
# fields in memory, so this bounds them.
FORM_FIELD_BYTES_MAX = 4 * 1024
# Parts of an upload: the file and a preview image; price and preview_text.
FORM_FILES_MAX = 2
FORM_FIELDS_MAX = 2
# A preview never changes once stored: browsers may keep it for a day.
PREVIEW_CACHE_S = 86_400
PRICE_REQUIRED = (
    f"field 'price' is required and must be an integer between {AMOUNT_MIN} and {AMOUNT_MAX}"
)
_RANGE_RE = re.compile(r"^bytes=(\d{0,19})-(\d{0,19})\Z")

IdentityOf = Callable[..., Identity]
LimitCreates = Callable[[Identity], None]


def media_routes(
    node: Node, identity_of: IdentityOf, limit_creates: LimitCreates
) -> list[BaseRoute]:
    media = node.media
    settings = node.settings
    upload_bytes_max = (
        max(settings.media_image_bytes_max, settings.media_video_bytes_max)
        + settings.media_preview_bytes_max
        + MULTIPART_OVERHEAD_BYTES_MAX
    )

    async def upload(request: Request) -> Response:
        identity = identity_of(request, "model")
        limit_creates(identity)
        declared = request.headers.get("content-length", "")
        # The length first: int() of a long digit string is slow (and refused past 4300).
        if not (declared.isascii() and declared.isdigit() and len(declared) <= 19):
            raise BadRequest("send the upload with a Content-Length")
        if int(declared) > upload_bytes_max:
            raise BadRequest(f"the upload is over {upload_bytes_max} bytes")
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise BadRequest("send the upload as multipart/form-data")
        await node.directory.touch_user(identity)
        try:
            async with request.form(
                max_files=FORM_FILES_MAX,
                max_fields=FORM_FIELDS_MAX,
                max_part_size=FORM_FIELD_BYTES_MAX,
            ) as form:
                content = _upload(form.get("file"), "file")
                if content is None:
                    raise BadRequest("field 'file' is required: the photo or video")
                preview = _upload(form.get("preview"), "preview")
                price = _price(form.get("price"))
                preview_text = form.get("preview_text")
                if preview_text is not None and not isinstance(preview_text, str):
                    raise BadRequest("field 'preview_text' must be text")
                info = await media.create(
                    identity.user_id, content, price, preview_text or None, preview
                )
        except HTTPException as exc:  # Starlette's refusal of a malformed form
            raise BadRequest(f"the form is malformed: {exc.detail}") from None
        return _json({"media": info.descriptor()})

    async def describe(request: Request) -> Response:
        info = await media.info(request.path_params["media_id"])
        return _json({"media": info.descriptor(), "owner": info.owner})

    async def set_price(request: Request) -> Response:
        identity = identity_of(request, "model")
        body = await json_body(request)
        price = optional_int(body, "price", AMOUNT_MIN, AMOUNT_MAX)
        if price is None:
            raise BadRequest(PRICE_REQUIRED)
        info = await media.set_price(identity.user_id, request.path_params["media_id"], price)
        return _json({"media": info.descriptor()})

    async def signed_url(request: Request) -> Response:
        identity = identity_of(request)
        info = await media.info(request.path_params["media_id"])
        if info.owner != identity.user_id and not await node.economy.entitled(
            identity.user_id, info.id
        ):
            raise Forbidden("unlock this media first")
        return _json(media.signed_url(info.id))

    async def content(request: Request) -> Response:
        media_id = request.path_params["media_id"]
        media.check_signature(
            media_id, request.query_params.get("exp", ""), request.query_params.get("sig", "")
        )
        info = await media.info(media_id)
        size = await media.store.size(content_name(media_id))
        headers = {
            "Accept-Ranges": "bytes",
            "Cache-Control": "private, no-store",
            "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": "sandbox; default-src 'none'",
        }
        wanted = _byte_range(request.headers.get("range"), size)
        if wanted == "unsatisfiable":
            headers["Content-Range"] = f"bytes */{size}"
            return Response(status_code=416, headers=headers)
        start, end, status = (0, size - 1, 200) if wanted is None else (*wanted, 206)
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        headers["Content-Length"] = str(end - start + 1)
        body = read_range(media.store, content_name(media_id), start, end)
        return StreamingResponse(
            body, status_code=status, headers=headers, media_type=info.content_type
        )

    async def preview(request: Request) -> Response:
        info = await media.info(request.path_params["media_id"])
        if not info.preview_image:
            raise NotFound("this media's preview is a text")
        name = preview_name(info.id)
        data = await media.store.read(name, 0, await media.store.size(name))
        headers = {
            "Cache-Control": f"public, max-age={PREVIEW_CACHE_S}",
            "X-Content-Type-Options": "nosniff",
        }
        return Response(data, media_type=PREVIEW_CONTENT_TYPE, headers=headers)

    return [
        Route("/v1/media", upload, methods=["POST"]),
        Route("/v1/media/{media_id}", describe, methods=["GET"]),
        Route("/v1/media/{media_id}", set_price, methods=["PUT"]),
        Route("/v1/media/{media_id}/url", signed_url),
        Route("/v1/media/{media_id}/content", content),
        Route("/v1/media/{media_id}/preview", preview),
    ]


def _json(content: Any) -> Response:
    return JSONResponse(content)


def _upload(value: Any, name: str) -> Upload | None:
    if value is None:
        return None
    if not isinstance(value, UploadFile) or value.size is None:
        raise BadRequest(f"field '{name}' must be a file")
    if value.size == 0:
        raise BadRequest(f"field '{name}' is empty")
    return Upload(value.file, value.size)


def _price(value: Any) -> int:
    # The length first: int() of a long digit string is slow.
    if not isinstance(value, str) or not value.isascii() or not value.isdigit() or len(value) > 7:
        raise BadRequest(PRICE_REQUIRED)
    price = int(value)
    if not AMOUNT_MIN <= price <= AMOUNT_MAX:
        raise BadRequest(PRICE_REQUIRED)
    return price


def _byte_range(header: str | None, size: int) -> tuple[int, int] | str | None:
    """The one byte range asked for (inclusive), None to send it all (no
    Range, or one this server does not serve: several ranges, another
    unit), or "unsatisfiable" (RFC 9110, section 14.1.2)."""
    if header is None:
        return None
    match = _RANGE_RE.fullmatch(header.strip())
    if match is None:
        return None
    first, last = match.group(1), match.group(2)
    if not first and not last:
        return None
    if not first:  # a suffix: the last N bytes
        suffix = int(last)
        if suffix == 0 or size == 0:
            return "unsatisfiable"
        return max(0, size - suffix), size - 1
    start = int(first)
    end = size - 1 if not last else min(int(last), size - 1)
    if start >= size or (last and int(last) < start):
        return "unsatisfiable" if start >= size else None
    return start, end
