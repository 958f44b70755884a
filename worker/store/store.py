"""The ledger's PostgreSQL side: one transaction per fetched batch, each partition fenced by its stored offset."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import asyncpg

from worker.core.auth import Authority, Credentials, Key, Scope, secret_deriver
from worker.core.decide import decide_batch
from worker.core.model import Command, Decision, Hold, Parsed, PartitionState, Price, StoredDecision, Wallet
from worker.core.outgoing import Outgoing
from worker.store.queries import QUERIES
from worker.store.rows import decision_columns, outbox_columns, outbox_records

# A decision's encoded reply, and the records it sends (reply or dead letter, event).
Render = Callable[[Decision], tuple[bytes, list[Outgoing]]]

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
    # Seen when the server shuts down under a query: "cannot switch to state 15; another operation
    # is in progress" (loadtest/chaos.py). Committed or not, a retry is safe: the stored offset
    # fences a batch decided twice.
    asyncpg.exceptions.InternalClientError,
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
class PartitionBatch:
    partition: int
    seen_offset: int  # the next offset this worker last saw stored for the partition
    records: Sequence[Parsed]


@dataclass(frozen=True, slots=True)
class Committed:
    next_offset: int
    decisions: list[Decision]
    outbox: Outbox | None  # what the batch sends, once committed; None: nothing


@dataclass(frozen=True, slots=True)
class Outbox:
    """One outbox row: a partition's batch of records to publish, then delete by position."""

    position: int
    records: list[Outgoing]


KEYS_CACHED_MAX = 100_000


class Store:
    def __init__(self, pool: asyncpg.Pool, master_secret: bytes | None = None) -> None:
        self._pool = pool
        self._secret_of = secret_deriver(master_secret) if master_secret is not None else None
        # What the auth tables held at `_auth_version`: read again only when the version moves.
        self._auth_version: int | None = None
        self._auth_modes: tuple[tuple[int, bool], ...] = ()
        self._auth_keys: dict[str, Key | None] = {}  # None: no such key (at that version)

    @classmethod
    async def connect(
        cls, database_url: str, pool_size_max: int = POOL_SIZE_MAX, master_secret: bytes | None = None
    ) -> Store:
        pool = await asyncpg.create_pool(
            database_url,
            min_size=1,
            max_size=pool_size_max,
            command_timeout=COMMAND_TIMEOUT_S,
            timeout=CONNECT_TIMEOUT_S,
        )
        return cls(pool, master_secret)

    @property
    def pool(self) -> asyncpg.Pool:
        return self._pool

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
        render: Render,
        published: Sequence[int] = (),
    ) -> Committed:
        """Decide and store a batch of one partition in one transaction (see `apply_batches`)."""
        outcome = (await self.apply_batches(topic, [PartitionBatch(partition, seen_offset, batch)], render, published))[partition]
        if isinstance(outcome, Fenced):
            raise outcome
        return outcome

    async def apply_batches(
        self,
        topic: str,
        batches: Sequence[PartitionBatch],
        render: Render,
        published: Sequence[int] = (),
    ) -> dict[int, Committed | Fenced]:
        """Decide and store the batches of several partitions in one transaction: one flush for all.

        Each partition is decided on its own by the core, in offset order, exactly as alone.
        Records below a partition's `seen_offset` were decided before and are skipped. A partition
        whose stored offset moved away from its `seen_offset` (only another worker can have done
        that) is left out and answered with `Fenced`; the others are committed. `published` names
        outbox rows the broker has acknowledged since: they are deleted in the same transaction.
        """
        outcome: dict[int, Committed | Fenced] = {}
        fresh: dict[int, tuple[int, list[Parsed]]] = {}
        for batch in batches:
            records = [parsed for parsed in batch.records if parsed.record.offset >= batch.seen_offset]
            assert all(parsed.record.partition == batch.partition for parsed in records)
            if records:
                fresh[batch.partition] = (batch.seen_offset, records)
            else:
                outcome[batch.partition] = Committed(batch.seen_offset, [], None)
        if not fresh:
            await self.delete_outbox(published)
            return outcome
        if _wallets_shared(fresh):
            # A wallet written from two partitions (a producer that chose partitions by hand) is
            # decided partition by partition, so that each sees the other's writes.
            for i, (partition, (seen, records)) in enumerate(fresh.items()):
                one = await self.apply_batches(topic, [PartitionBatch(partition, seen, records)], render,
                                               published if i == 0 else ())  # fmt: skip
                outcome.update(one)
            return outcome
        async with self._pool.acquire() as connection, connection.transaction():
            # Locked in partition order, so that two workers never wait on each other in a cycle.
            rows = await connection.fetch(QUERIES["lock_partitions"], topic, sorted(fresh))
            stored = {int(row["partition"]): row for row in rows}
            owned: dict[int, tuple[int, list[Parsed], int]] = {}
            for partition, (seen, records) in fresh.items():
                row = stored.get(partition)
                if row is None or row["next_offset"] != seen:
                    outcome[partition] = Fenced(partition, -1 if row is None else int(row["next_offset"]))
                else:
                    owned[partition] = (seen, records, int(row["clock_ms"]))
            states = await self._load(connection, {p: (clock, records) for p, (_, records, clock) in owned.items()})
            authority = await self._authority(connection, [p for _, records, _ in owned.values() for p in records])
            for state in states.values():
                state.authority = authority
            before = {name: wallet for state in states.values() for name, wallet in state.wallets.items()}
            decided = {partition: decide_batch(states[partition], records) for partition, (_, records, _) in owned.items()}
            after = {name: wallet for state in states.values() for name, wallet in state.wallets.items()}
            every = [decision for decisions in decided.values() for decision in decisions]
            await self._write_wallets(connection, before, after)
            await self._write_holds(connection, [d.hold for d in every if d.stored and d.hold is not None])
            outboxes = await self._write_decisions_and_outbox(connection, topic, decided, render)
            if published:
                await connection.execute(QUERIES["delete_outbox"], list(published))
            advanced = [(topic, partition, seen, records[-1].record.offset + 1, states[partition].clock_ms)
                        for partition, (seen, records, _) in owned.items()]  # fmt: skip
            if advanced:
                await connection.executemany(QUERIES["advance_partition"], advanced)  # the rows are locked above
        for partition, (_, records, _) in owned.items():
            outcome[partition] = Committed(records[-1].record.offset + 1, decided[partition], outboxes[partition])
        return outcome

    async def _authority(self, connection: asyncpg.Connection, batch: Sequence[Parsed]) -> Authority | None:
        """The auth modes and the keys the batch names, as committed before this transaction
        locked its partitions. None while authentication has never been switched on."""
        version = await connection.fetchval(QUERIES["auth_version"])
        if version != self._auth_version:
            rows = await connection.fetch(QUERIES["auth_modes"])
            self._auth_modes = tuple((int(r["valid_from_ms"]), r["mode"] == "required") for r in rows)
            self._auth_keys.clear()
            self._auth_version = version
        if not self._auth_modes:
            return None
        named = {parsed.credentials.key_id for parsed in batch if isinstance(parsed.credentials, Credentials)}
        missing = sorted(named - self._auth_keys.keys())
        if missing:
            if len(self._auth_keys) + len(missing) > KEYS_CACHED_MAX:
                self._auth_keys.clear()
            self._auth_keys.update({key_id: None for key_id in missing})
            for row in await connection.fetch(QUERIES["auth_keys_named"], missing):
                self._auth_keys[row["key_id"]] = _key(row)
        keys = {key_id: key for key_id in named if (key := self._auth_keys.get(key_id)) is not None}
        return Authority(self._auth_modes, keys, self._secret_of)

    async def _load(
        self, connection: asyncpg.Connection, batches: dict[int, tuple[int, Sequence[Parsed]]]
    ) -> dict[int, PartitionState]:
        """Each partition's state for its batch: the wallets, decisions, holds and prices it names."""
        states = {partition: PartitionState(partition, clock_ms) for partition, (clock_ms, _) in batches.items()}
        keys = {partition: {(p.command.wallet, p.command.id) for p in batch if not _invalid(p)}
                for partition, (_, batch) in batches.items()}  # fmt: skip
        commands = {partition: [p.command for p in batch if isinstance(p.command, Command)]
                    for partition, (_, batch) in batches.items()}  # fmt: skip
        owner = {wallet: partition for partition, pairs in keys.items() for wallet, _ in pairs}
        if not owner:
            return states
        for row in await connection.fetch(QUERIES["load_wallets"], sorted(owner)):
            states[owner[row["wallet"]]].wallets[row["wallet"]] = Wallet(**dict(row))
        pairs = sorted(pair for partition_pairs in keys.values() for pair in partition_pairs)
        rows = await connection.fetch(QUERIES["load_decisions"], [wallet for wallet, _ in pairs], [id_ for _, id_ in pairs])
        for row in rows:
            stored = StoredDecision(row["fingerprint"], json.loads(row["reply"]))
            states[owner[row["wallet"]]].decisions[(row["wallet"], row["id"])] = stored
        holds = sorted({(c.wallet, c.hold) for batch in commands.values() for c in batch if c.hold is not None})
        if holds:
            rows = await connection.fetch(QUERIES["load_holds"], [w for w, _ in holds], [h for _, h in holds])
            for row in rows:
                states[owner[row["wallet"]]].holds[(row["wallet"], row["hold"])] = Hold(**dict(row))
        models = {partition: {c.usage.model for c in batch if c.usage is not None} for partition, batch in commands.items()}
        wanted = sorted(set().union(*models.values()))
        if wanted:
            prices: dict[str, list[Price]] = {}
            for row in await connection.fetch(QUERIES["load_prices"], wanted):
                prices.setdefault(row["model"], []).append(Price(**dict(row)))
            for partition, names in models.items():
                states[partition].prices.update({name: prices[name] for name in names if name in prices})
        return states

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

    async def _write_decisions_and_outbox(
        self, connection: asyncpg.Connection, topic: str, decided: dict[int, list[Decision]], render: Render
    ) -> dict[int, Outbox | None]:
        """The stored decisions (each with its reply, encoded once) and one outbox row per partition."""
        stored: list[Decision] = []
        replies: list[bytes] = []
        sends: dict[int, list[Outgoing]] = {}
        for partition, decisions in decided.items():
            records = sends[partition] = []
            for decision in decisions:
                encoded, outgoing = render(decision)
                records += outgoing
                if decision.stored:
                    stored.append(decision)
                    replies.append(encoded)
        if stored:
            await connection.execute(QUERIES["insert_decisions"], *decision_columns(stored, replies))
        outboxes: dict[int, Outbox | None] = {partition: None for partition in decided}
        for partition, records in sends.items():
            if records:
                position = await connection.fetchval(QUERIES["insert_outbox"], topic, partition, *outbox_columns(records))
                outboxes[partition] = Outbox(int(position), records)
        return outboxes

    async def pending_outbox(self, topic: str, partition: int) -> list[Outbox]:
        """What an earlier owner of the partition committed but may not have published, in order."""
        async with self._pool.acquire() as connection:
            rows = await connection.fetch(QUERIES["outbox_of_partition"], topic, partition)
        return [Outbox(int(row["position"]), outbox_records(row)) for row in rows]

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


def _key(row: asyncpg.Record) -> Key:
    return Key(row["key_id"], Scope(row["scope"]), row["wallet"], int(row["valid_from_ms"]),
               None if row["revoked_at_ms"] is None else int(row["revoked_at_ms"]))  # fmt: skip


def _wallets_shared(batches: dict[int, tuple[int, list[Parsed]]]) -> bool:
    """True when some wallet is named by the batches of two partitions."""
    seen: set[str] = set()
    for _, records in batches.values():
        names = {p.command.wallet for p in records if not _invalid(p)}
        if names & seen:
            return True
        seen |= names
    return False

