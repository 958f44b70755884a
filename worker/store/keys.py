"""The ledger's keys and its authentication mode: created, revoked and switched here, never deleted.

Every change takes effect at a time that is later than every command decided before it and no
earlier than the database's clock; it holds the batches back while it commits, so that each batch
decides wholly under the old state or wholly under the new one. A replay, which compares the same
times with the same commands, therefore decides as the live workers did.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import asyncpg

from worker.config import ENV_AUTH, ENV_MASTER_SECRET, ENV_MASTER_SECRET_FILE, Misconfigured
from worker.core.auth import SWEEPER_KEY_ID, Scope, derive_secret, master_check
from worker.store.queries import QUERIES

KEY_ID_PREFIX = "fgk_"
KEY_ID_RANDOM_BYTES = 10
LABEL_LENGTH_MAX_CHARS = 256


class KeyExists(Exception):
    pass


class WrongMasterSecret(Exception):
    """The master secret given is not the one this ledger's keys were made with."""


@dataclass(frozen=True, slots=True)
class KeyRow:
    key_id: str
    scope: Scope
    wallet: str | None
    label: str
    valid_from_ms: int
    revoked_at_ms: int | None


@dataclass(frozen=True, slots=True)
class NewKey:
    key: KeyRow
    secret: str  # shown once to whoever created it; stored nowhere


async def _effective_time_ms(connection: asyncpg.Connection) -> int:
    """Inside a transaction: hold the batches back, then a time past every decided command."""
    await connection.execute(QUERIES["auth_hold_batches"])
    latest_ms = await connection.fetchval(QUERIES["latest_clock_ms"])
    now_ms = await connection.fetchval(QUERIES["database_time_ms"])
    return max(int(now_ms), int(latest_ms) + 1)


async def check_master(connection: asyncpg.Connection, master: bytes) -> None:
    """The first master secret used with a ledger is its master for good; another is refused."""
    stored = await connection.fetchval(QUERIES["auth_set_master_check"], master_check(master))
    if stored != master_check(master):
        raise WrongMasterSecret("this master secret is not the one the ledger's keys were made with")


async def create_key(connection: asyncpg.Connection, master: bytes, scope: Scope, wallet: str | None = None,
                     label: str = "", key_id: str | None = None) -> NewKey:  # fmt: skip
    assert (scope is Scope.WALLET) == (wallet is not None)
    assert len(label) <= LABEL_LENGTH_MAX_CHARS
    key_id = key_id or KEY_ID_PREFIX + secrets.token_hex(KEY_ID_RANDOM_BYTES)
    async with connection.transaction():
        # The partitions table first, like every key change: one lock order, no deadlock.
        valid_from_ms = await _effective_time_ms(connection)
        await check_master(connection, master)
        added = await connection.fetchval(QUERIES["auth_add_key"], key_id, scope.value, wallet, label, valid_from_ms)
        if added is None:
            raise KeyExists(key_id)
        await connection.execute(QUERIES["auth_bump_version"])
    return NewKey(KeyRow(key_id, scope, wallet, label, valid_from_ms, None), derive_secret(master, key_id))


async def ensure_sweeper_key(connection: asyncpg.Connection, master: bytes) -> None:
    """The workers' own key, allowed `expire` alone; made once per ledger."""
    try:
        await create_key(connection, master, Scope.EXPIRE, label="the workers' hold sweeper", key_id=SWEEPER_KEY_ID)
    except KeyExists:
        pass


async def revoke_key(connection: asyncpg.Connection, key_id: str) -> int | None:
    """Revoke at once: every command from now on is refused. None when no such open key exists."""
    async with connection.transaction():
        revoked_at_ms = await _effective_time_ms(connection)
        done = await connection.fetchval(QUERIES["auth_revoke_key"], key_id, revoked_at_ms)
        if done is not None:
            await connection.execute(QUERIES["auth_bump_version"])
    return done


async def list_keys(connection: asyncpg.Connection) -> list[KeyRow]:
    rows = await connection.fetch(QUERIES["auth_list_keys"])
    return [KeyRow(r["key_id"], Scope(r["scope"]), r["wallet"], r["label"], r["valid_from_ms"], r["revoked_at_ms"])
            for r in rows]  # fmt: skip


async def current_mode(connection: asyncpg.Connection) -> str:
    rows = await connection.fetch(QUERIES["auth_modes"])
    return rows[-1]["mode"] if rows else "off"


async def set_mode(connection: asyncpg.Connection, mode: str) -> int | None:
    """Switch authentication on ('required') or off, from a time past every decided command.
    None when the ledger is in that mode already."""
    assert mode in ("off", "required")
    async with connection.transaction():
        valid_from_ms = await _effective_time_ms(connection)
        if await current_mode(connection) == mode:
            return None
        await connection.execute(QUERIES["auth_add_mode"], valid_from_ms, mode)
        await connection.execute(QUERIES["auth_bump_version"])
    return valid_from_ms


async def prepare_worker(connection: asyncpg.Connection, auth_required: bool, master: bytes | None) -> str:
    """At a worker's start: the ledger's mode made to match the worker's setting where that is safe,
    refused (Misconfigured) where it is not. Returns the mode the ledger is in."""
    if master is not None:
        try:
            await check_master(connection, master)
        except WrongMasterSecret as error:
            raise Misconfigured(f"{ENV_MASTER_SECRET_FILE} / {ENV_MASTER_SECRET}: {error}") from None
    mode = await current_mode(connection)
    if auth_required:
        if master is None:
            raise Misconfigured(f"{ENV_AUTH}=required needs the master secret ({ENV_MASTER_SECRET_FILE} or {ENV_MASTER_SECRET})")
        await ensure_sweeper_key(connection, master)
        if mode != "required":
            await set_mode(connection, "required")
        return "required"
    if mode == "required":
        raise Misconfigured(f"this ledger requires authentication: set {ENV_AUTH}=required "
                            "(or turn it off for every worker first: `floorguard auth off`)")  # fmt: skip
    return mode
