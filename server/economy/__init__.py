"""The token economy's hot path: Lua scripts (``lua/``), the batcher, ``Economy``."""
