"""The HTTP API (Starlette) and the payment providers behind purchases."""
