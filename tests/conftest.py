"""Fixtures: real Redis and Postgres, isolated per test, and a running server.

Each test gets its own Redis key prefix and its own Postgres schema, removed
afterwards, so tests never see each other's data and can run against a
shared Redis and Postgres. Set TOKENCHAT_TEST_REDIS_URL and
TOKENCHAT_TEST_DATABASE_URL to use other servers than the local defaults.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis

from client_demo.client import Client
from server.app import Process
from server.auth import issue_token
from server.config import Settings
from server.db import migrate

REDIS_URL = os.environ.get("TOKENCHAT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
DATABASE_URL = os.environ.get(
    "TOKENCHAT_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
JWT_SECRET = "test-secret-" + "x" * 32


@pytest.fixture
async def settings() -> AsyncIterator[Settings]:
    tag = uuid.uuid4().hex[:12]
    schema = f"t_{tag}"
    prefix = f"t:{tag}:"
    await migrate(DATABASE_URL, schema)
    yield Settings(
        redis_url=REDIS_URL,
        redis_prefix=prefix,
        database_url=DATABASE_URL,
        database_schema=schema,
        jwt_secret=JWT_SECRET,
        host="127.0.0.1",
        http_port=0,
        ws_port=0,
        # Tests exercise presence without waiting a whole second each time.
        presence_interval_s=0.1,
        shutdown_grace_s=3.0,
    )
    conn = await asyncpg.connect(DATABASE_URL)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()
    redis: Redis = Redis.from_url(REDIS_URL)
    try:
        keys = [key async for key in redis.scan_iter(match=f"{prefix}*", count=1000)]
        if keys:
            await redis.delete(*keys)
    finally:
        await redis.aclose()


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[Redis]:
    client: Redis = Redis.from_url(settings.redis_url)
    yield client
    await client.aclose()


def token(sub: str, role: str = "fan", ttl_s: int = 3600) -> str:
    return issue_token(JWT_SECRET, sub, role, ttl_s)


class Running:
    """A server process started in the test's event loop."""

    def __init__(self, process: Process) -> None:
        self.process = process
        self.ws_url = f"ws://127.0.0.1:{process.ws_port}/ws"
        self.http_url = f"http://127.0.0.1:{process.http_port}"

    async def client(
        self,
        sub: str | None = None,
        role: str = "fan",
        *,
        subprotocol: str | None = "tokenchat.v1.json",
    ) -> Client:
        client = await Client.connect(self.ws_url, subprotocol=subprotocol)
        if sub is not None:
            await client.hello(token(sub, role))
        return client


@pytest.fixture
async def start_server(settings: Settings) -> AsyncIterator[Callable[..., Awaitable[Running]]]:
    started: list[Process] = []

    async def start(**overrides: Any) -> Running:
        process = Process(settings.replace(**overrides))
        await process.start()
        started.append(process)
        return Running(process)

    yield start
    for process in started:
        await process.stop()


@pytest.fixture
async def server(start_server: Callable[..., Awaitable[Running]]) -> Running:
    return await start_server()


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not await check():  # noqa: ASYNC110 - polling a remote state
            await asyncio.sleep(0.02)
