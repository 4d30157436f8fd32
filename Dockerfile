# syntax=docker/dockerfile:1
# The tokenchat image: one image for the three processes of compose.yaml (and of
# the Procfile): `tokenchat migrate`, `tokenchat serve` and `tokenchat ledger`.
#
# NOT BUILT BY CI: no base-image registry is reachable from the machines that run
# the tests. CI lints this file with hadolint and runs the exact commands of
# compose.yaml as local processes (tests/server/test_docker.py); docs/deploy.md,
# "Docker", says what that proves and what it does not.
#
#   docker build -t tokenchat .
#   docker run --rm tokenchat --help

# Debian slim: every dependency has a manylinux wheel (asyncpg, hiredis, uvloop,
# orjson, msgpack, pillow) for x86_64 and aarch64, so no compiler is needed and
# musl (Alpine) would only force source builds.
ARG PYTHON_IMAGE=python:3.12-slim-bookworm

# --- builder: the project's wheel and every dependency's, nothing installed ---------
FROM ${PYTHON_IMAGE} AS builder
WORKDIR /src
# pyproject.toml and the package folders only (.dockerignore keeps tests, docs'
# images, caches and virtualenvs out of the context).
COPY pyproject.toml README.md LICENSE ./
COPY server/ server/
COPY protocol/ protocol/
COPY client_demo/ client_demo/
# A wheel, not an editable install: the image must hold the package data
# (migrations/*.sql, lua/*.lua, static/*) exactly as a pip user gets it.
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# --- runtime: the wheels installed, no build tools, no source tree -----------------
FROM ${PYTHON_IMAGE}
# A fixed uid/gid, so a volume prepared on the host (media) can be chowned to it.
RUN groupadd --system --gid 10001 tokenchat \
    && useradd --system --no-log-init --uid 10001 --gid tokenchat \
        --home-dir /var/lib/tokenchat --create-home --shell /usr/sbin/nologin tokenchat \
    # Made here, owned by the user: a named volume mounted on it starts with
    # this owner (a folder Docker made for the mount would be root's).
    && install --directory --owner=tokenchat --group=tokenchat /var/lib/tokenchat/media
# Installed from the builder's wheels through a bind mount: the wheels never land
# in a layer of this image. --no-index: nothing is fetched at this step.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels tokenchat==0.1.0

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
# Every setting is a TOKENCHAT_ variable (README.md, "Configuration"); these are
# the ones a container needs different from a laptop's defaults: listen on every
# interface of the container (the default is 127.0.0.1), keep uploaded media in
# the user's home (mount a volume there: compose.yaml does), and log one JSON
# object a line, which log collectors (docker logs, Loki) parse. No secret is
# set here: TOKENCHAT_JWT_SECRET comes from the environment at run time.
# DL3064 (sensitive data in ENV) is a false alarm: it matches "TOKEN" in the
# prefix TOKENCHAT_, and none of these values is secret.
# hadolint ignore=DL3064
ENV TOKENCHAT_HOST=0.0.0.0 \
    TOKENCHAT_MEDIA_DIR=/var/lib/tokenchat/media \
    TOKENCHAT_LOG_FORMAT=json
WORKDIR /var/lib/tokenchat
# Numeric: Kubernetes runAsNonRoot can check it without reading /etc/passwd.
USER 10001:10001

# The HTTP API and the demo page; the WebSocket gateway (unless --one-port).
EXPOSE 8000 8001
# Liveness of `serve`: /healthz answers 200 while the process runs. Not /readyz:
# Redis or Postgres being away is not cured by restarting this container, and
# /readyz (503 then) is what a load balancer should ask. The ledger writer
# has no HTTP API: compose.yaml gives it its own check (its metrics port).
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % (os.environ.get('TOKENCHAT_HTTP_PORT') or '8000'), timeout=4)"]

ENTRYPOINT ["tokenchat"]
CMD ["serve"]
