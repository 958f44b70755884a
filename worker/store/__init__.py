"""The store: the only layer that speaks to PostgreSQL (and the only one that imports asyncpg)."""
