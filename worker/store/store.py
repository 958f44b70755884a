"""The ledger's PostgreSQL side: one transaction per partition batch, fenced by the stored offset."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import asyncpg

from worker.core.decide import decide_batch
from worker.core.model import Command, Decision, Hold, Parsed, PartitionState, Price, StoredDecision, Wallet
from worker.core.outgoing import Outgoing
from worker.store.queries import QUERIES

POOL_SIZE_MAX = 8
COMMAND_TIMEOUT_S = 30
CONNECT_TIMEOUT_S = 10


# Faults worth retrying: the connection went away or the server asked us to try again.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.SerializationError,
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
)


class Fenced(Exception):
    """The partition's stored offset is not the one this worker last saw: someone else owns it."""

    def __init__(self, partition: int, stored_offset: int) -> None:
        super().__init__(f"partition {partition} is at offset {stored_offset} in the database")
        self.partition = partition
        self.stored_offset = stored_offset


class GuardRefused(AssertionError):
    """The database refused a state the core accepted: a bug, so the process stops."""


@dataclass(frozen=True, slots=True)
class Committed:
    next_offset: int
    decisions: list[Decision]
    outbox: list[tuple[int, Outgoing]]  # (position, record) to publish, then delete


class Store:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @classmethod
    async def connect(cls, database_url: str, pool_size_max: int = POOL_SIZE_MAX) -> Store:
        pool = await asyncpg.create_pool(
            database_url,
            min_size=1,
            max_size=pool_size_max,
            command_timeout=COMMAND_TIMEOUT_S,
            timeout=CONNECT_TIMEOUT_S,
        )
        return cls(pool)

    async def close(self) -> None:
        await self._pool.close()

    async def claim(self, topic: str, partition: int) -> int:
        """The next offset to decide on a partition this worker was just assigned."""
        async with self._pool.acquire() as connection:
            await connection.execute(QUERIES["claim_partition"], topic, partition)
            row = await connection.fetchrow(QUERIES["partition_position"], topic, partition)
        return int(row["next_offset"])

    async def apply_batch(
        self,
        topic: str,
        partition: int,
        seen_offset: int,
        batch: Sequence[Parsed],
        render: Callable[[Decision], list[Outgoing]],
        published: Sequence[int] = (),
    ) -> Committed:
        """Decide and store a batch of one partition in one transaction.

        Records below `seen_offset` were decided before and are skipped. Raises `Fenced` when the
        stored offset moved away from `seen_offset`, which only another worker can have done.
        `published` names outbox rows the broker has acknowledged since: they are deleted in the
        same transaction, which saves a commit of their own.
        """
        fresh = [parsed for parsed in batch if parsed.record.offset >= seen_offset]
        assert all(parsed.record.partition == partition for parsed in fresh)
        if not fresh:
            await self.delete_outbox(published)
            return Committed(seen_offset, [], [])
        next_offset = fresh[-1].record.offset + 1
        async with self._pool.acquire() as connection, connection.transaction():
            row = await connection.fetchrow(QUERIES["lock_partition"], topic, partition)
            if row is None or row["next_offset"] != seen_offset:
                raise Fenced(partition, -1 if row is None else int(row["next_offset"]))
            state = await self._load(connection, partition, int(row["clock_ms"]), fresh)
            before = dict(state.wallets)
            decisions = decide_batch(state, fresh)
            await self._write_wallets(connection, before, state.wallets)
            await self._write_holds(connection, [d.hold for d in decisions if d.stored and d.hold is not None])
            await self._write_decisions(connection, [d for d in decisions if d.stored])
            outbox = await self._write_outbox(connection, topic, partition, decisions, render)
            if published:
                await connection.execute(QUERIES["delete_outbox"], list(published))
            status = await connection.execute(
                QUERIES["advance_partition"], topic, partition, seen_offset, next_offset, state.clock_ms
            )
            assert status == "UPDATE 1", status
        return Committed(next_offset, decisions, outbox)

    async def _load(
        self, connection: asyncpg.Connection, partition: int, clock_ms: int, batch: Sequence[Parsed]
    ) -> PartitionState:
        state = PartitionState(partition, clock_ms)
        keys = sorted({(p.command.wallet, p.command.id) for p in batch if not _invalid(p)})
        if not keys:
            return state
        wallets = sorted({wallet for wallet, _ in keys})
        for row in await connection.fetch(QUERIES["load_wallets"], wallets):
            state.wallets[row["wallet"]] = Wallet(**dict(row))
        rows = await connection.fetch(
            QUERIES["load_decisions"], [wallet for wallet, _ in keys], [id_ for _, id_ in keys]
        )
        for row in rows:
            state.decisions[(row["wallet"], row["id"])] = StoredDecision(row["fingerprint"], json.loads(row["reply"]))
        commands = [p.command for p in batch if isinstance(p.command, Command)]
        holds = sorted({(c.wallet, c.hold) for c in commands if c.hold is not None})
        if holds:
            rows = await connection.fetch(QUERIES["load_holds"], [w for w, _ in holds], [h for _, h in holds])
            for row in rows:
                state.holds[(row["wallet"], row["hold"])] = Hold(**dict(row))
        models = sorted({c.usage.model for c in commands if c.usage is not None})
        if models:
            for row in await connection.fetch(QUERIES["load_prices"], models):
                state.prices.setdefault(row["model"], []).append(Price(**dict(row)))
        return state

    async def _write_wallets(
        self, connection: asyncpg.Connection, before: dict[str, Wallet], after: dict[str, Wallet]
    ) -> None:
        opened = [wallet for name, wallet in after.items() if name not in before]
        if opened:
            await connection.execute(
                QUERIES["insert_wallets"],
                [w.wallet for w in opened],
                [w.floor for w in opened],
                [w.partition for w in opened],
            )
        # Every wallet that moved past its opening state goes through the guarded statement,
        # measured from the state the core decided on.
        start = {**before, **{w.wallet: _opening(w) for w in opened}}
        moved = [w for name, w in after.items() if w != start[name]]
        if not moved:
            return
        status = await connection.execute(
            QUERIES["apply_wallets"],
            [w.wallet for w in moved],
            [w.balance - start[w.wallet].balance for w in moved],
            [w.reserved - start[w.wallet].reserved for w in moved],
            [start[w.wallet].seq for w in moved],
            [w.seq for w in moved],
        )
        if status != f"UPDATE {len(moved)}":
            raise GuardRefused(f"guarded update changed {status!r} of {len(moved)} wallets")

    async def _write_holds(self, connection: asyncpg.Connection, holds: list[Hold]) -> None:
        latest = {(h.wallet, h.hold): h for h in holds}  # a batch may change one hold twice
        if not latest:
            return
        await connection.execute(
            QUERIES["upsert_holds"],
            [h.wallet for h in latest.values()],
            [h.hold for h in latest.values()],
            [h.amount for h in latest.values()],
            [h.expires_at_ms for h in latest.values()],
            [h.open for h in latest.values()],
            [h.partition for h in latest.values()],
        )

    async def _write_decisions(self, connection: asyncpg.Connection, stored: list[Decision]) -> None:
        if not stored:
            return
        columns: list[list[object]] = [[] for _ in range(15)]
        for decision in stored:
            reply, record, wallet = decision.reply, decision.parsed.record, decision.wallet
            assert wallet is not None
            row = (
                reply["wallet"], reply["id"], reply["seq"], reply["op"], reply["status"],
                reply["error"], reply.get("amount"), wallet.balance, wallet.reserved,
                decision.at_ms, decision.fingerprint, decision.memo, record.partition,
                record.offset, json.dumps(reply, separators=(",", ":"), ensure_ascii=False),
            )  # fmt: skip
            for column, value in zip(columns, row, strict=True):
                column.append(value)
        await connection.execute(QUERIES["insert_decisions"], *columns)

    async def _write_outbox(
        self,
        connection: asyncpg.Connection,
        topic: str,
        partition: int,
        decisions: list[Decision],
        render: Callable[[Decision], list[Outgoing]],
    ) -> list[tuple[int, Outgoing]]:
        records = [record for decision in decisions for record in render(decision)]
        if not records:
            return []
        rows = await connection.fetch(
            QUERIES["insert_outbox"],
            topic,
            partition,
            [r.topic for r in records],
            [r.partition for r in records],
            [r.key for r in records],
            [r.value for r in records],
            [encode_headers(r.headers) for r in records],
        )
        return list(zip((int(row["position"]) for row in rows), records, strict=True))

    async def pending_outbox(self, topic: str, partition: int) -> list[tuple[int, Outgoing]]:
        """What an earlier owner of the partition committed but may not have published."""
        async with self._pool.acquire() as connection:
            rows = await connection.fetch(QUERIES["outbox_of_partition"], topic, partition)
        return [
            (
                int(row["position"]),
                Outgoing(row["topic"], row["partition"], row["key"], row["value"], decode_headers(row["headers"])),
            )
            for row in rows
        ]

    async def delete_outbox(self, positions: Sequence[int]) -> None:
        if positions:
            async with self._pool.acquire() as connection:
                await connection.execute(QUERIES["delete_outbox"], list(positions))

    async def add_price(self, price: Price, lead_ms: int) -> bool:
        """Add a row of the price table; False when its start is not at least `lead_ms` ahead."""
        async with self._pool.acquire() as connection:
            row = await connection.fetchrow(
                QUERIES["add_price"], price.model, price.valid_from_ms, price.input_price, price.output_price, lead_ms
            )
        return row is not None

    async def prices(self) -> list[Price]:
        async with self._pool.acquire() as connection:
            return [Price(**dict(row)) for row in await connection.fetch(QUERIES["list_prices"])]

    async def expired_holds(self, partitions: Sequence[int], broker_now_ms: int, limit: int) -> list[Hold]:
        async with self._pool.acquire() as connection:
            rows = await connection.fetch(QUERIES["expired_holds"], list(partitions), broker_now_ms, limit)
        return [Hold(r["wallet"], r["hold"], 0, r["expires_at_ms"], True, r["partition"]) for r in rows]

    async def earliest_open_hold(self, partitions: Sequence[int]) -> Hold | None:
        async with self._pool.acquire() as connection:
            row = await connection.fetchrow(QUERIES["earliest_open_hold"], list(partitions))
        return None if row is None else Hold(row["wallet"], row["hold"], 0, row["expires_at_ms"], True, row["partition"])

    async def show_wallet(self, wallet: str) -> Wallet | None:
        async with self._pool.acquire() as connection:
            row = await connection.fetchrow(QUERIES["show_wallet"], wallet)
        return None if row is None else Wallet(**dict(row))


def _invalid(parsed: Parsed) -> bool:
    return not isinstance(parsed.command, Command)


def _opening(wallet: Wallet) -> Wallet:
    return Wallet(wallet.wallet, 0, 0, wallet.floor, 1, wallet.partition)


def encode_headers(headers: tuple[tuple[str, bytes], ...]) -> str:
    return json.dumps([[name, value.hex()] for name, value in headers])


def decode_headers(text: str) -> tuple[tuple[str, bytes], ...]:
    return tuple((name, bytes.fromhex(value)) for name, value in json.loads(text))
