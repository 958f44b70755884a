"""Reading the books whole: the database's own checks for the auditor, and the comparison of two
ledgers for `replay --verify`."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from worker.store.queries import QUERIES

CURSOR_PREFETCH_ROWS = 5_000
CONNECT_TIMEOUT_S = 10


@dataclass(frozen=True, slots=True)
class Violation:
    check: str
    wallet: str | None
    detail: str

    def __str__(self) -> str:
        return f"{self.check}: {self.wallet + ': ' if self.wallet else ''}{self.detail}"


async def connect(database_url: str) -> asyncpg.Connection:
    return await asyncpg.connect(database_url, timeout=CONNECT_TIMEOUT_S)


async def database_violations(connection: asyncpg.Connection, commands_topic: str) -> list[Violation]:
    """Every invariant the database can check on its own."""
    found = []
    for row in await connection.fetch(QUERIES["audit_floor"]):
        found.append(Violation("floor", row["wallet"], f"balance {row['balance']} − reserved {row['reserved']} "
                               f"< floor {row['floor']}"))  # fmt: skip
    for row in await connection.fetch(QUERIES["audit_balances"]):
        found.append(Violation("balance", row["wallet"], f"balance {row['balance']} ≠ accepted moves {row['moved']}"))
    for row in await connection.fetch(QUERIES["audit_reserved"]):
        found.append(Violation("reserved", row["wallet"], f"reserved {row['reserved']} ≠ open holds {row['held']}"))
    for row in await connection.fetch(QUERIES["audit_sequences"]):
        found.append(Violation("seq", row["wallet"], f"wallet seq {row['seq']}, {row['decided']} decisions "
                               f"numbered {row['first']}…{row['last']}"))  # fmt: skip
    for row in await connection.fetch(QUERIES["audit_offsets"], commands_topic):
        found.append(Violation("offsets", None, f"partition {row['partition']} offset {row['offset']}: "
                               f"{row['decisions']} decisions, stored position {row['next_offset']}"))  # fmt: skip
    return found


async def counts(connection: asyncpg.Connection) -> dict[str, int]:
    return dict(await connection.fetchrow(QUERIES["audit_counts"]))


async def wallet_seqs(connection: asyncpg.Connection) -> dict[str, int]:
    return {row["wallet"]: row["seq"] for row in await connection.fetch(QUERIES["wallet_seqs"])}


async def stored_replies(connection: asyncpg.Connection, keys: Sequence[tuple[str, int]]) -> dict[tuple[str, int], dict]:
    """The stored decisions of (wallet, seq) pairs, as events carry them."""
    rows = await connection.fetch(QUERIES["decisions_by_seq"], [w for w, _ in keys], [s for _, s in keys])
    return {
        (row["wallet"], row["seq"]): {**json.loads(row["reply"]), "partition": row["partition"], "offset": row["offset"]}
        for row in rows
    }


async def partition_positions(connection: asyncpg.Connection, commands_topic: str) -> dict[int, int]:
    return {row["partition"]: row["next_offset"] for row in await connection.fetch(QUERIES["partition_positions"], commands_topic)}


async def _rows(connection: asyncpg.Connection, query: str) -> AsyncIterator[dict[str, Any]]:
    async with connection.transaction(readonly=True, isolation="repeatable_read"):
        async for row in connection.cursor(QUERIES[query], prefetch=CURSOR_PREFETCH_ROWS):
            yield dict(row)


async def first_divergence(live: asyncpg.Connection, rebuilt: asyncpg.Connection,
                           ends: dict[int, int], compare_wallets: bool) -> str | None:  # fmt: skip
    """The first decision (then wallet) that differs between the two ledgers, or None.

    Only decisions of records below `ends` are compared: the live ledger may have moved on.
    """
    def within(row: dict[str, Any]) -> bool:
        return row["offset"] < ends.get(row["partition"], 0)

    mismatch = await _first_mismatch(_filtered(_rows(live, "decisions_in_order"), within),
                                     _rows(rebuilt, "decisions_in_order"), ("wallet", "seq"))  # fmt: skip
    if mismatch is not None or not compare_wallets:
        return mismatch and f"decision {mismatch}"
    mismatch = await _first_mismatch(_rows(live, "wallets_in_order"), _rows(rebuilt, "wallets_in_order"), ("wallet",))
    return mismatch and f"wallet {mismatch}"


async def _filtered(rows: AsyncIterator[dict[str, Any]], keep) -> AsyncIterator[dict[str, Any]]:
    async for row in rows:
        if keep(row):
            yield row


async def _first_mismatch(left: AsyncIterator[dict[str, Any]], right: AsyncIterator[dict[str, Any]],
                          key: tuple[str, ...]) -> str | None:  # fmt: skip
    while True:
        a = await anext(left, None)
        b = await anext(right, None)
        if a is None and b is None:
            return None
        if a != b:
            name = lambda row: None if row is None else tuple(row[k] for k in key)  # noqa: E731
            differing = sorted(k for k in (a or b) if (a or {}).get(k) != (b or {}).get(k))
            return f"{name(a) or name(b)}: live {name(a)} vs rebuilt {name(b)}; fields {', '.join(differing)}"
