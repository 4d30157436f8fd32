"""The tokenchat server, one sub-package per concept (DESIGN.md section 2).

- ``gateway``: the WebSocket gateway, a session per connection, the hub that
  writes room events to local members, the node that wires them together, the
  Redis pub/sub broker, room history and presence, health.
- ``economy``: the paid-action registry (``actions``: one declaration per
  kind of spend), every money movement as one Lua script (``lua/``), the
  pipelining batcher and the ``Economy`` that runs them.
- ``ledger``: the outbox writer into Postgres, reconcile, and the confirmations
  that let a spend wait for its ledger row.
- ``catalog``: users and rooms (Postgres, cached in Redis).
- ``http``: the Starlette HTTP API and the payment providers.
- ``devstack``: the embedded Redis and PostgreSQL of ``tokenchat dev``.

At this root: what every part shares (``config``, ``errors``, ``metrics``,
``aio``, ``auth``, ``keys``, ``bus`` (the pub/sub payloads), ``ratelimit``,
``db`` and its ``migrations/``), the process runner (``app``) and the
command line (``cli``). Dependencies point one way: ``tokenchat.protocol`` <-
the server; the ledger never needs a gateway.
"""
