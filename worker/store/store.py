"""The ledger's PostgreSQL side: what a batch reads and writes, each statement set-based.

`worker/decider.py` puts them together into one transaction per batch (lock, load, decide, write);
this module knows the tables and the statements, not the order of a batch.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Container, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field

import asyncpg

from worker.core.auth import Authority, Credentials, Key, Scope, secret_deriver
from worker.core.codes import Op
from worker.core.model import Command, Decision, Hold, Parsed, PartitionState, Price, StoredDecision, Wallet
from worker.core.native import COMPILED_COLUMNS
from worker.core.outgoing import Outgoing
from worker.core.recent import Recent
from worker.store.queries import QUERIES
from worker.store.rows import bool_array, decision_columns, decode_records, encode_records, id_array, int_array

# A decision's encoded reply, and the records it sends (reply or dead letter, event).
Render = Callable[[Decision], tuple[bytes, list[Outgoing]]]

POOL_SIZE_MAX = 8
COMMAND_TIMEOUT_S = 30
CONNECT_TIMEOUT_S = 10
GUARD_REFUSED_SQLSTATE = "FG001"  # raised by floorguard_commit when the guarded statement skips a wallet
STORED_ALREADY_SQLSTATE = "FG002"  # raised by floorguard_commit when a decision's (wallet, id) is stored


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


class StoredAlready(Exception):
    """A batch presumed an id new that has a decision stored: nothing was written; decide the batch
    again, looking up every id (migrations/0007_commit_checks_ids_and_wallets.sql)."""


@dataclass(frozen=True, slots=True)
class PartitionBatch:
    partition: int
    seen_offset: int  # the next offset this worker last saw stored for the partition
    records: Sequence[Parsed]
    # What the worker holds of the partition since it decided up to `seen_offset` (its last
    # batch's state), or None: then whatever the batch needs is read from the database.
    state: PartitionState | None = None
    committing: bool = False  # the batch before this one may not be committed yet
    # The ids decided on the partition lately (worker/core/recent.py): with `look_up_all` false,
    # only these are looked up for an earlier decision, the others presumed new (the commit checks
    # the presumption). The batch's stored decisions are added to it.
    recent: Recent | None = None
    look_up_all: bool = True


@dataclass(frozen=True, slots=True)
class Committed:
    next_offset: int
    decisions: list[Decision]
    outbox: Outbox | None  # what the batch sends, once committed; None: nothing
    state: PartitionState | None = None  # the partition's state after the batch, valid at next_offset


@dataclass(frozen=True, slots=True)
class Position:
    next_offset: int
    clock_ms: int


@dataclass(frozen=True, slots=True)
class Write:
    """What one partition's batch decided, to store: the wallets it named as it found them (None:
    no such wallet) and as it leaves them, its decisions, and where the partition now stands."""

    partition: int
    seen_offset: int
    next_offset: int
    clock_ms: int
    before: dict[str, Wallet | None]
    after: dict[str, Wallet | None]
    decisions: list[Decision]


@dataclass(slots=True)
class Stored:
    """What `Store.commit` did: each written partition's outbox row (None: nothing to send), or,
    having written nothing, the partitions fenced (with where each stands) or the auth version
    that is not the batch's."""

    outboxes: dict[int, Outbox | None] = field(default_factory=dict)
    fenced: dict[int, int] = field(default_factory=dict)
    auth_version: int | None = None


@dataclass(frozen=True, slots=True)
class Outbox:
    """One outbox row: a partition's batch of records to publish, then delete by position."""

    position: int
    records: list[Outgoing]


KEYS_CACHED_MAX = 100_000


class Store:
    def __init__(self, pool: asyncpg.Pool, master_secret: bytes | None = None, compiled: bool = True) -> None:
        self._pool = pool
        # A batch's decision rows, built compiled when native/ is installed (worker/core/native.py).
        self._decision_columns = COMPILED_COLUMNS if compiled and COMPILED_COLUMNS is not None else decision_columns
        self._secret_of = secret_deriver(master_secret) if master_secret is not None else None
        # What the auth tables held at `_auth_version`: read again only when the version moves.
        self._auth_version: int | None = None
        self._auth_modes: tuple[tuple[int, bool], ...] = ()
        self._auth_keys: dict[str, Key | None] = {}  # None: no such key (at that version)
        # Set when a commit met another version: until then batches are decided under the cached
        # one without reading it, and the commit, which reads it under the lock, says when it moved.
        self._auth_stale = True

    @classmethod
    async def connect(
        cls, database_url: str, pool_size_max: int = POOL_SIZE_MAX, master_secret: bytes | None = None,
        compiled: bool = True,
    ) -> Store:
        pool = await asyncpg.create_pool(
            database_url,
            min_size=1,
            max_size=pool_size_max,
            command_timeout=COMMAND_TIMEOUT_S,
            timeout=CONNECT_TIMEOUT_S,
            reset=_keep_session,
        )
        return cls(pool, master_secret, compiled)

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

    def connection(self) -> AbstractAsyncContextManager[asyncpg.Connection]:
        """A connection of the pool, each statement its own transaction."""
        return self._pool.acquire()

    async def positions(self, connection: asyncpg.Connection, topic: str, partitions: Sequence[int]) -> dict[int, Position]:
        """Where each partition stands, as committed (no lock)."""
        rows = await connection.fetch(QUERIES["partition_positions_of"], topic, sorted(partitions))
        return {int(row["partition"]): Position(int(row["next_offset"]), int(row["clock_ms"])) for row in rows}

    async def load(self, connection: asyncpg.Connection, states: dict[int, PartitionState],
                   batches: dict[int, Sequence[Parsed]],
                   doubted: dict[int, Container[tuple[str, str]] | None] | None = None) -> None:  # fmt: skip
        """Fill each partition's state with what its batch names and the state lacks: wallets and
        holds (a state carried over from the last batch has most of them), the earlier decisions
        under the batch's (wallet, id) pairs (all of them, or those its `doubted` names), and the
        prices of the models it names."""
        owner: dict[str, int] = {}
        pairs: list[tuple[str, str]] = []
        holds: list[tuple[str, str]] = []
        models: dict[int, set[str]] = {}
        missing: list[str] = []
        doubted = doubted or {}
        for partition, batch in batches.items():
            state = states[partition]
            known_wallets, known_holds = state.wallets, state.holds
            doubts = doubted.get(partition)
            for parsed in batch:
                command = parsed.command
                if command.__class__ is not Command:
                    continue
                wallet = command.wallet
                if wallet not in owner:
                    owner[wallet] = partition
                    if wallet not in known_wallets:
                        missing.append(wallet)
                pair = (wallet, command.id)
                # An expire is always looked up: it may be refused 409 hold_not_expired, which is
                # not stored, so the commit could not catch an earlier decision under its id.
                if doubts is None or pair in doubts or command.op is Op.EXPIRE:
                    pairs.append(pair)
                if command.hold is not None and (wallet, command.hold) not in known_holds:
                    holds.append((wallet, command.hold))
                if command.usage is not None:
                    models.setdefault(partition, set()).add(command.usage.model)
        if not owner:
            return
        if missing:
            for row in await connection.fetch(QUERIES["load_wallets"], id_array(missing)):
                states[owner[row[0]]].wallets[row[0]] = Wallet(*row)
        if pairs:
            wallets, ids = zip(*pairs, strict=True)
            rows = await connection.fetch(QUERIES["load_decisions"], id_array(wallets), id_array(ids))
            for wallet, id_, fingerprint, reply in rows:
                states[owner[wallet]].decisions[(wallet, id_)] = StoredDecision(fingerprint, json.loads(reply))
        if holds:
            wallets, named = zip(*holds, strict=True)
            for row in await connection.fetch(QUERIES["load_holds"], id_array(wallets), id_array(named)):
                states[owner[row[0]]].holds[(row[0], row[1])] = Hold(*row)
        wanted = sorted(set().union(*models.values()))
        if wanted:
            prices: dict[str, list[Price]] = {}
            for row in await connection.fetch(QUERIES["load_prices"], wanted):
                prices.setdefault(row["model"], []).append(Price(*row))
            for partition, names in models.items():
                states[partition].prices.update({name: prices[name] for name in names if name in prices})

    async def auth_version(self, connection: asyncpg.Connection) -> int:
        """Moves with every change of keys or modes (docs/security.md)."""
        return int(await connection.fetchval(QUERIES["auth_version"]))

    async def authority(self, connection: asyncpg.Connection, batch: Iterable[Parsed]) -> tuple[int, Authority | None]:
        """The auth state's version, and the auth modes and the keys the batch names at that
        version; no authority while authentication has never been switched on.

        The version is read only when the cache is stale (at start, and after a commit met another
        one): a batch decided under a version that has moved is refused by its commit, which reads
        the version under the partitions' lock (`commit`), and decided again.

        Batches are decided side by side (a heavy fetch's partitions), so what one reads is put
        together in locals and cached only when its version is the newest seen: a batch never
        decides with another version's modes or keys, nor finds a key it names cached as absent."""
        if not self._auth_stale and self._auth_version is not None:
            version, modes, cached = self._auth_version, self._auth_modes, self._auth_keys
        else:
            self._auth_stale = False
            version = await self.auth_version(connection)
            if version == self._auth_version:
                modes, cached = self._auth_modes, self._auth_keys
            else:
                rows = await connection.fetch(QUERIES["auth_modes"])
                modes, cached = tuple((int(r["valid_from_ms"]), r["mode"] == "required") for r in rows), {}
                if self._auth_version is None or version > self._auth_version:  # versions only grow
                    self._auth_version, self._auth_modes, self._auth_keys = version, modes, cached
        if not modes:
            return version, None
        named = {parsed.credentials.key_id for parsed in batch if isinstance(parsed.credentials, Credentials)}
        missing = sorted(named - cached.keys())
        found: dict[str, Key] = {}
        if missing:
            found = {row["key_id"]: _key(row) for row in await connection.fetch(QUERIES["auth_keys_named"], missing)}
            if cached is self._auth_keys:  # still the newest version's cache
                if len(cached) + len(missing) > KEYS_CACHED_MAX:
                    cached.clear()
                cached.update({key_id: found.get(key_id) for key_id in missing})
        keys = {key_id: key for key_id in named if (key := found.get(key_id) or cached.get(key_id)) is not None}
        return version, Authority(modes, keys, self._secret_of)

    async def commit(self, topic: str, writes: Sequence[Write], sends: dict[int, list[Outgoing]],
                     stored: dict[int, list[tuple[Decision, bytes]]], published: Sequence[int],
                     auth_version: int | None) -> Stored:  # fmt: skip
        """Store what the batches decided, in one transaction and one round trip: wallets through
        the guarded statement, holds, decisions (`stored`: each partition's stored decisions with
        their encoded replies), one outbox row per partition of what it sends; delete the acknowledged outbox
        rows; advance each partition from the offset this worker saw to the one after its batch.
        Nothing is written when a partition is fenced or the auth version is not `auth_version`."""
        opened: list[Wallet] = []
        moved: list[tuple[Wallet, Wallet]] = []  # (as the batch found it, as it leaves it)
        holds: dict[tuple[str, str], Hold] = {}  # a batch may change one hold twice: the last counts
        for write in writes:
            for name, before in write.before.items():
                after = write.after[name]
                if before is None:
                    if after is not None:
                        opened.append(after)
                        if after != (start := _opening(after)):
                            moved.append((start, after))
                elif after != before:
                    moved.append((before, after))
            for decision in write.decisions:
                if decision.stored and decision.hold is not None:
                    holds[(decision.hold.wallet, decision.hold.hold)] = decision.hold
        ordered = sorted(writes, key=lambda write: write.partition)
        latest = list(holds.values())
        kept = [(write.partition, sends[write.partition]) for write in ordered if sends[write.partition]]
        decisions = [pair for write in ordered for pair in stored[write.partition]]
        async with self._pool.acquire() as connection:
            try:
                rows = await connection.fetch(
                    QUERIES["commit_batch"], topic,
                    int_array(w.partition for w in ordered), int_array(w.seen_offset for w in ordered),
                    int_array(w.next_offset for w in ordered), int_array(w.clock_ms for w in ordered),
                    auth_version, int_array(published),
                    id_array([w.wallet for w in opened]), int_array(w.floor for w in opened),
                    int_array(w.partition for w in opened),
                    id_array([a.wallet for _, a in moved]), int_array(a.balance - b.balance for b, a in moved),
                    int_array(a.reserved - b.reserved for b, a in moved), int_array(b.seq for b, _ in moved),
                    int_array(a.seq for _, a in moved),
                    id_array([h.wallet for h in latest]), id_array([h.hold for h in latest]),
                    int_array(h.amount for h in latest), int_array(h.expires_at_ms for h in latest),
                    bool_array(h.open for h in latest), int_array(h.partition for h in latest),
                    *self._decision_columns([d for d, _ in decisions], [encoded for _, encoded in decisions]),
                    int_array(p for p, _ in kept), [encode_records(records) for _, records in kept])  # fmt: skip
            except asyncpg.PostgresError as error:
                if error.sqlstate == GUARD_REFUSED_SQLSTATE:
                    raise GuardRefused(str(error)) from error
                if error.sqlstate == STORED_ALREADY_SQLSTATE:
                    raise StoredAlready(str(error)) from error
                raise
        result = Stored()
        for kind, partition, value in rows:
            if kind == "outbox":
                result.outboxes[partition] = Outbox(value, sends[partition])
            elif kind == "fenced":
                result.fenced[partition] = value
            else:
                result.auth_version = value
        if result.auth_version is not None and result.auth_version != self._auth_version:
            self._auth_stale = True  # the next batch reads the auth state again
        return result

    async def pending_outbox(self, topic: str, partition: int) -> list[Outbox]:
        """What an earlier owner of the partition committed but may not have published, in order."""
        async with self._pool.acquire() as connection:
            rows = await connection.fetch(QUERIES["outbox_of_partition"], topic, partition)
        return [Outbox(int(row["position"]), decode_records(row["records"])) for row in rows]

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


async def _keep_session(connection: asyncpg.Connection) -> None:
    """The pool's reset on release, which by default sends a statement (RESET ALL and the like):
    one more round trip per batch. The worker and the tools set no session state (no SET, LISTEN,
    cursors or session locks), and asyncpg still rolls back a transaction left open."""


def _opening(wallet: Wallet) -> Wallet:
    return Wallet(wallet.wallet, 0, 0, wallet.floor, 1, wallet.partition)


def _key(row: asyncpg.Record) -> Key:
    return Key(row["key_id"], Scope(row["scope"]), row["wallet"], int(row["valid_from_ms"]),
               None if row["revoked_at_ms"] is None else int(row["revoked_at_ms"]))  # fmt: skip
