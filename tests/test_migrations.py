"""Migrations carry what an older worker left behind into the new shape, on the real PostgreSQL."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import asyncpg

from tests.conftest import Services, _with_database
from worker.core.outgoing import Outgoing
from worker.store.migrate import MIGRATIONS_DIR, migrate
from worker.store.store import Store

# Records as the worker before migration 0004 kept them: one row each, headers as JSON of hex.
OLD_OUTBOX = [  # (source_partition, topic, partition, key, value, headers)
    (0, "fg.replies", None, b"w1", b'{"ok":true}', [("content-type", b"application/json"), ("correlation_id", b"c1")]),
    (0, "fg.events", 3, b"w1", b'{"seq":2}', [("content-type", b"application/json")]),
    (1, "fg.dlq", None, None, b"\xff\x00not json", [("reason", "value: not UTF-8 ✗".encode()), ("x", b"\x00\xff")]),
    (0, "fg.replies.agent-7", 0, b"w2", b"{}", []),
]


async def test_migration_0004_carries_the_old_outbox_rows_over_in_order(services: Services, tmp_path: Path):
    name = f"floorguard_migrate_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(services.database_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    url = _with_database(services.database_url, name)
    try:
        for path in sorted(MIGRATIONS_DIR.glob("000[1-3]_*.sql")):  # the ledger as it stood before 0004
            shutil.copy(path, tmp_path / path.name)
        await migrate(url, tmp_path)
        connection = await asyncpg.connect(url)
        try:
            for source, topic, partition, key, value, headers in OLD_OUTBOX:
                await connection.execute(
                    "INSERT INTO outbox (source_topic, source_partition, topic, partition, key, value, headers) "
                    "VALUES ('fg.commands', $1, $2, $3, $4, $5, $6)",
                    source, topic, partition, key, value, json.dumps([[n, v.hex()] for n, v in headers]))  # fmt: skip
            old_max = await connection.fetchval("SELECT max(position) FROM outbox")
        finally:
            await connection.close()
        assert (await migrate(url))[0] == "0004_outbox_batches"
        store = await Store.connect(url)
        try:
            for source in (0, 1):
                expected = [Outgoing(topic, partition, key, value, tuple(headers))
                            for s, topic, partition, key, value, headers in OLD_OUTBOX if s == source]  # fmt: skip
                [outbox] = await store.pending_outbox("fg.commands", source)
                assert outbox.records == expected
                assert outbox.position > old_max  # an old worker deleting its positions meets none of these
        finally:
            await store.close()
    finally:
        admin = await asyncpg.connect(services.database_url)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
