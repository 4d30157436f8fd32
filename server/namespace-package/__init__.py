"""tokenchat: a real-time WebSocket chat server with a token economy.

Everything installed lives under this one namespace, so nothing generic lands
in site-packages:

- ``tokenchat.protocol``: the wire contract v1, pure (codecs, commands, events,
  limits, error codes); the checkout's ``protocol/`` folder.
- ``tokenchat.server``: the gateway, economy, ledger, HTTP API and CLI; ``server/``.
- ``tokenchat.client_demo``: the client library, the terminal client and the demo
  page; ``client_demo/``.

This package's own folder is ``server/namespace-package/``: the specified top
level of the checkout stays as it is, and a folder name that is not a Python
identifier cannot be imported a second time as ``tokenchat.server.<name>``.
``python -m tokenchat`` is the ``tokenchat`` command.
"""
