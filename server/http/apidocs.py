"""The machine-readable APIs: ``GET /openapi.json`` (the HTTP API, OpenAPI
3.1, server/http/openapi.py), ``GET /asyncapi.json`` (the WebSocket protocol,
AsyncAPI 3.0, protocol/schema.py) and ``GET /docs``, the HTTP API rendered by
Swagger UI.

Swagger UI is vendored in the demo page's package data
(client_demo/static/vendor/swagger-ui, its version and licence beside it):
the page loads nothing from another origin, under the same Content-Security-
Policy as the demo page. Both documents are built once, at app creation:
they depend on the code only.
"""

from __future__ import annotations

import sys
from pathlib import Path

import orjson
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Route

from tokenchat.protocol.schema import asyncapi_document

from .api import PAGE_HEADERS, STATIC_DIR, JSONResponse
from .openapi import openapi_document

OPENAPI_PATH = "/openapi.json"
ASYNCAPI_PATH = "/asyncapi.json"
DOCS_PATH = "/docs"
# The documents change only with the code: a client may cache them briefly,
# and revalidates after a deploy within this long.
DOCUMENT_CACHE_S = 300


def apidocs_routes() -> list[BaseRoute]:
    headers = {"Cache-Control": f"public, max-age={DOCUMENT_CACHE_S}"}
    openapi = JSONResponse(openapi_document(), headers=headers).body
    asyncapi = JSONResponse(asyncapi_document(), headers=headers).body

    async def openapi_json(request: Request) -> Response:
        return Response(openapi, media_type="application/json", headers=headers)

    async def asyncapi_json(request: Request) -> Response:
        return Response(asyncapi, media_type="application/json", headers=headers)

    async def docs(request: Request) -> Response:
        return FileResponse(STATIC_DIR / "docs.html", headers=PAGE_HEADERS)

    return [
        Route(OPENAPI_PATH, openapi_json),
        Route(ASYNCAPI_PATH, asyncapi_json),
        Route(DOCS_PATH, docs),
    ]


def write_documents(folder: Path) -> None:
    """Write openapi.json and asyncapi.json into ``folder`` (docs/ keeps a
    copy of each, for readers without a server; a test keeps them current)."""
    for name, document in (
        ("openapi.json", openapi_document()),
        ("asyncapi.json", asyncapi_document()),
    ):
        text = orjson.dumps(document, option=orjson.OPT_INDENT_2).decode() + "\n"
        (folder / name).write_text(text)


if __name__ == "__main__":
    # python -m tokenchat.server.http.apidocs docs/
    write_documents(Path(sys.argv[1] if len(sys.argv) > 1 else "docs"))
