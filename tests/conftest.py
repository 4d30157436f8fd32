"""Fixtures: real Redis and Postgres, isolated per test, and a running server.

Each test gets its own Redis key prefix and its own Postgres schema, removed
afterwards, so tests never see each other's data and can run against a
shared Redis and Postgres. Set TOKENCHAT_TEST_REDIS_URL and
TOKENCHAT_TEST_DATABASE_URL to use other servers than the local defaults.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis

from tests.apischema import CheckedClient, check_http_reply
from tests.proxy import Proxy
from tokenchat.client_demo.client import Client
from tokenchat.server import redis_client
from tokenchat.server.app import Process
from tokenchat.server.auth import issue_token
from tokenchat.server.config import Settings
from tokenchat.server.db import migrate
from tokenchat.server.gateway.node import Node

JWT_SECRET = "test-secret-" + "x" * 32
# How long a local server may take to answer the probe before it counts as absent.
PROBE_TIMEOUT_S = 2.0


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def _backends() -> tuple[str, str]:
    """Redis and Postgres URLs: from the environment, the local servers, or
    embedded servers started for this test run when no local one answers (so
    the test command works on a machine with only Python)."""
    # TOKENCHAT_TEST_EMBEDDED=1 uses embedded servers even when local ones run.
    force_embedded = os.environ.get("TOKENCHAT_TEST_EMBEDDED") == "1"
    redis_url = os.environ.get("TOKENCHAT_TEST_REDIS_URL")
    database_url = os.environ.get("TOKENCHAT_TEST_DATABASE_URL")
    if redis_url is None:
        redis_url = "redis://127.0.0.1:6379/0"
        if force_embedded or not _answers("127.0.0.1", 6379):
            redis_url = _embedded("redis")
    if database_url is None:
        database_url = "postgresql://postgres@127.0.0.1:5432/postgres"
        if force_embedded or not _answers("127.0.0.1", 5432):
            database_url = _embedded("postgres")
    return redis_url, database_url


_EMBEDDED: list[Any] = []


def _embedded(kind: str) -> str:
    from tokenchat.server.devstack import embedded

    data_dir = Path(tempfile.mkdtemp(prefix=f"tokenchat-test-{kind}-"))
    data_dir.chmod(0o755)  # PostgreSQL runs as an unprivileged user when we are root
    server_class = embedded.EmbeddedRedis if kind == "redis" else embedded.EmbeddedPostgres
    instance = server_class(data_dir)
    url = instance.start()
    _EMBEDDED.append(instance)
    return url


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    while _EMBEDDED:
        _EMBEDDED.pop().stop()


REDIS_URL, DATABASE_URL = _backends()

# The Redis backends a test marked `cluster` runs on: each such test runs
# once on the single Redis and once on a local Redis Cluster of three
# primaries (tokenchat.server.devstack.cluster), started once per session
# on first use. `pytest -m cluster` runs that subset alone.
REDIS_BACKENDS = ("single", "cluster")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "cluster: also run on a local Redis Cluster of three primaries"
        " (cluster(only=True): on the cluster alone)",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    marker = metafunc.definition.get_closest_marker("cluster")
    if marker is not None and "redis_backend" in metafunc.fixturenames:
        backends = ("cluster",) if marker.kwargs.get("only") else REDIS_BACKENDS
        metafunc.parametrize("redis_backend", backends, indirect=True)


@pytest.fixture(scope="session")
def redis_cluster_url() -> Iterator[str]:
    """The URL of a local Redis Cluster of three primaries, for this session."""
    from tokenchat.server.devstack.cluster import LocalCluster

    with LocalCluster() as cluster:
        yield cluster.url


@pytest.fixture
def redis_backend(request: pytest.FixtureRequest) -> str:
    """ "single" (the shared Redis), or "cluster" for a test marked cluster."""
    return str(getattr(request, "param", "single"))


def _open_redis(settings: Settings) -> Redis:
    """A client of the test's Redis, single or cluster (typed alike)."""
    if settings.redis_cluster:
        return redis_client.connect(settings, max_connections=16, socket_timeout_s=10.0)
    return Redis.from_url(settings.redis_url)


@pytest.fixture
async def settings(request: pytest.FixtureRequest, redis_backend: str) -> AsyncIterator[Settings]:
    redis_url, redis_cluster = REDIS_URL, 0
    if redis_backend == "cluster":
        redis_url, redis_cluster = request.getfixturevalue("redis_cluster_url"), 1
    tag = uuid.uuid4().hex[:12]
    schema = f"t_{tag}"
    prefix = f"t:{tag}:"
    await migrate(DATABASE_URL, schema)
    media_dir = tempfile.mkdtemp(prefix=f"tokenchat-test-media-{tag}-")
    yield Settings(
        redis_url=redis_url,
        redis_cluster=redis_cluster,
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
        media_dir=media_dir,
    )
    shutil.rmtree(media_dir, ignore_errors=True)
    conn = await asyncpg.connect(DATABASE_URL)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()
    redis = _open_redis(Settings(redis_url=redis_url, redis_cluster=redis_cluster))
    try:
        # On a cluster, scan_iter scans every primary and delete splits by slot.
        keys = [key async for key in redis.scan_iter(match=f"{prefix}*", count=1000)]
        if keys:
            await redis.delete(*keys)
    finally:
        await redis.aclose()


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[Redis]:
    client = _open_redis(settings)
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
        # Events its clients got that /asyncapi.json does not describe
        # (tests/apischema.py); start_server fails the test on any.
        self.schema_problems: list[str] = []

    @property
    def node(self) -> Node:
        node = self.process.node
        assert node is not None, "the process has not started"
        return node

    async def client(
        self,
        sub: str | None = None,
        role: str = "fan",
        *,
        subprotocol: str | None = "tokenchat.v1.json",
    ) -> Client:
        client = await CheckedClient.connect(self.ws_url, subprotocol=subprotocol)
        assert isinstance(client, CheckedClient)
        client.watch(self.schema_problems)
        if sub is not None:
            await client.hello(token(sub, role))
        return client


@pytest.fixture
async def start_server(settings: Settings) -> AsyncIterator[Callable[..., Awaitable[Running]]]:
    started: list[Process] = []
    running: list[Running] = []

    async def start(**overrides: Any) -> Running:
        process = Process(settings.replace(**overrides))
        await process.start()
        started.append(process)
        running.append(Running(process))
        return running[-1]

    yield start
    for process in started:
        await process.stop()
    problems = [problem for each in running for problem in each.schema_problems]
    assert not problems, "frames /asyncapi.json does not describe:\n" + "\n".join(problems)


@pytest.fixture
async def server(start_server: Callable[..., Awaitable[Running]]) -> Running:
    return await start_server()


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not await check():  # noqa: ASYNC110 - polling a remote state
            await asyncio.sleep(0.02)


class Http:
    """The HTTP API of a running server, as some user."""

    def __init__(self, running: Running) -> None:
        self.base = running.http_url

    async def call(
        self, method: str, path: str, sub: str | None = None, role: str = "fan", **body: Any
    ) -> tuple[int, Any]:
        import httpx

        headers = {"Authorization": f"Bearer {token(sub, role)}"} if sub else {}
        async with httpx.AsyncClient(base_url=self.base, timeout=30) as http:
            response = await http.request(
                method, path, headers=headers, json=body if method != "GET" else None
            )
        reply = response.json()
        # Every reply of the suite's HTTP traffic, against /openapi.json.
        check_http_reply(method, path, response.status_code, reply)
        return response.status_code, reply

    async def credit(self, user: str, amount: int, key: str | None = None) -> dict[str, Any]:
        status, reply = await self.call(
            "POST",
            "/v1/admin/credits",
            "ops",
            "admin",
            user=user,
            amount=amount,
            key=key or uuid.uuid4().hex,
        )
        assert status == 200, reply
        return dict(reply)

    async def reconcile(self) -> dict[str, Any]:
        status, reply = await self.call("GET", "/v1/admin/reconcile", "ops", "admin")
        assert status == 200, reply
        return dict(reply)


@contextlib.asynccontextmanager
async def _proxied(url: str) -> AsyncIterator[Proxy]:
    proxy = Proxy(url)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()


@pytest.fixture
async def redis_proxy(settings: Settings) -> AsyncIterator[Proxy]:
    """The test's Redis behind a proxy the test can cut (see tests/proxy.py)."""
    async with _proxied(settings.redis_url) as proxy:
        yield proxy


@pytest.fixture
async def postgres_proxy(settings: Settings) -> AsyncIterator[Proxy]:
    """The test's Postgres behind a proxy the test can cut."""
    async with _proxied(settings.database_url) as proxy:
        yield proxy


@pytest.fixture
async def private_redis(tmp_path: Path) -> AsyncIterator[str]:
    """A valkey-server of this test's own, which it may FLUSHALL or CLIENT
    PAUSE without stalling everybody else's tests on the shared one."""
    from tokenchat.server.devstack.embedded import EmbeddedRedis

    server = EmbeddedRedis(tmp_path / "private-redis")
    url = await asyncio.to_thread(server.start)
    try:
        yield url
    finally:
        await asyncio.to_thread(server.stop)


async def pg(settings: Settings, sql: str, *args: Any) -> list[asyncpg.Record]:
    """Run one statement in the test's schema and return its rows."""
    conn = await asyncpg.connect(settings.database_url)
    try:
        await conn.execute(f'SET search_path TO "{settings.database_schema}"')
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()
