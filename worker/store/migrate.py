"""Applies the append-only files of `migrations/` in name order, each once, each atomically."""

from __future__ import annotations

from pathlib import Path

import asyncpg

from worker.store.queries import QUERIES

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"
CONNECT_TIMEOUT_S = 10


def migration_files(directory: Path = MIGRATIONS_DIR) -> list[Path]:
    files = sorted(directory.glob("[0-9][0-9][0-9][0-9]_*.sql"))
    assert files, f"no migrations in {directory}"
    return files


async def migrate(database_url: str, directory: Path = MIGRATIONS_DIR) -> list[str]:
    """Apply what is missing; return the versions applied now. Safe to run concurrently."""
    connection = await asyncpg.connect(database_url, timeout=CONNECT_TIMEOUT_S)
    applied_now = []
    try:
        async with connection.transaction():
            await connection.execute(QUERIES["migrations_lock"])
            await connection.execute(QUERIES["migrations_table"])
            applied = {row["version"] for row in await connection.fetch(QUERIES["migrations_applied"])}
            for path in migration_files(directory):
                version = path.stem
                if version in applied:
                    continue
                await connection.execute(path.read_text())
                await connection.execute(QUERIES["migration_record"], version)
                applied_now.append(version)
    finally:
        await connection.close()
    return applied_now
