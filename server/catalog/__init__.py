"""Users and rooms: Postgres holds them, Redis caches what the hot path reads."""
