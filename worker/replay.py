"""Rebuilds a ledger from the commands topic, through the worker's own core and store.

Offset 0 to the end (as it was when the replay began), each partition's records in order, in the
same per-partition batch transaction the worker uses (`Decider`), with nothing to
publish. The price table and the auth tables (keys and modes: scopes and times, no secret) are the
inputs outside the log: their rows are copied from the source ledger first (they are append-only,
so a copy is exact). A log written with authentication on is replayed with the same master secret,
so that every signature is checked again and every 401 and 403 is given again.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from aiokafka import ConsumerRecord

from worker.adapter import fetch_guard
from worker.adapter.fetch_guard import as_record
from worker.adapter.streams import read_to_end, topic_partitions
from worker.config import ENV_MASTER_SECRET, ENV_MASTER_SECRET_FILE, KafkaCredentials, Misconfigured, Topics
from worker.core.auth import master_check
from worker.core.outgoing import encode
from worker.core.model import PartitionState
from worker.core.native import PYTHON
from worker.decider import Decider
from worker.store import books
from worker.store.migrate import migrate
from worker.store.store import PartitionBatch, Store

PROGRESS_EVERY_S = 2.0


class NotEmpty(RuntimeError):
    pass


@dataclass(frozen=True, slots=True)
class Replayed:
    commands: int
    seconds: float
    ends: dict[int, int]

    @property
    def rate_per_s(self) -> float:
        return self.commands / self.seconds if self.seconds else 0.0


async def replay(bootstrap: str, topics: Topics, source_url: str, target_url: str,
                 progress: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
                 master_secret: bytes | None = None, credentials: KafkaCredentials | None = None) -> Replayed:  # fmt: skip
    fetch_guard.install()  # read every record of the log as the workers did
    await migrate(target_url)
    store = await Store.connect(target_url, master_secret=master_secret, compiled=False)  # the definition, as below
    try:
        await _prepare(store, source_url, target_url, topics, bootstrap, master_secret, credentials)
        partitions = await topic_partitions(bootstrap, topics.commands, credentials)
        return await _run(store, bootstrap, topics, len(partitions), progress, credentials)
    finally:
        await store.close()


async def _prepare(store: Store, source_url: str, target_url: str, topics: Topics, bootstrap: str,
                   master_secret: bytes | None, credentials: KafkaCredentials | None) -> None:  # fmt: skip
    target = await books.connect(target_url)
    source = await books.connect(source_url)
    try:
        if not await target.fetchval(books.QUERIES["is_empty"]):
            raise NotEmpty("replay --into needs an empty database")
        for row in await source.fetch(books.QUERIES["list_prices"]):
            await target.execute(books.QUERIES["copy_price"], *row.values())
        modes = await source.fetch(books.QUERIES["auth_modes"])
        for row in modes:
            await target.execute(books.QUERIES["auth_copy_mode"], *row.values())
        for row in await source.fetch(books.QUERIES["auth_list_keys"]):
            await target.execute(books.QUERIES["auth_copy_key"], *row.values())
        if any(row["mode"] == "required" for row in modes):
            settings = await source.fetchrow(books.QUERIES["auth_version"])
            if master_secret is None or settings["master_check"] != master_check(master_secret):
                raise Misconfigured(f"this log was written with authentication on: replay needs the ledger's master "
                                    f"secret ({ENV_MASTER_SECRET_FILE} or {ENV_MASTER_SECRET})")  # fmt: skip
    finally:
        await source.close()
        await target.close()
    for partition in await topic_partitions(bootstrap, topics.commands, credentials):
        await store.claim(topics.commands, partition)


async def _run(store: Store, bootstrap: str, topics: Topics, partition_count: int, progress: Callable[[str], None],
               credentials: KafkaCredentials | None) -> Replayed:  # fmt: skip
    forbidden = (topics.commands, topics.events, topics.dlq)
    # The Python core, the definition, rebuilds the ledger: a replay that agrees with the books the
    # worker wrote also checks the compiled path that wrote them (worker/core/native.py).
    decider, parse = Decider(store, PYTHON), PYTHON.parse
    seen: dict[int, int] = {}
    states: dict[int, PartitionState] = {}  # carried from batch to batch, as the worker does
    done = [0]
    started = last = time.monotonic()
    total = [0]

    async def apply(records: Sequence[ConsumerRecord]) -> None:
        nonlocal last
        partition = records[0].partition
        batch = [parse(as_record(raw.partition, raw), forbidden, partition_count) for raw in records]
        committed = await decider.apply_one(
            topics.commands, PartitionBatch(partition, seen.get(partition, 0), batch, states.get(partition)), _nothing)
        seen[partition], states[partition] = committed.next_offset, committed.state
        done[0] += len(records)
        if time.monotonic() - last > PROGRESS_EVERY_S:
            last = time.monotonic()
            rate = done[0] / (last - started)
            left = max(total[0] - done[0], 0) / rate if rate and total[0] else 0
            progress(f"replay: {done[0]:,} commands, {rate:,.0f}/s, about {left:,.0f} s left")

    ends = await read_to_end(bootstrap, topics.commands, apply, on_ends=lambda e: total.__setitem__(0, sum(e.values())),
                             credentials=credentials)  # fmt: skip
    seconds = time.monotonic() - started
    progress(f"replay: {done[0]:,} commands in {seconds:,.1f} s ({done[0] / max(seconds, 1e-9):,.0f}/s)")
    return Replayed(done[0], seconds, ends)


def _nothing(decision) -> tuple[bytes, list]:
    # A replay publishes nothing (every reply and event went out the first time); it stores the reply.
    return encode(decision.reply), []


async def verify(source_url: str, target_url: str, topics: Topics, ends: dict[int, int]) -> str | None:
    """The first divergence between the live ledger and the rebuilt one, or None."""
    live = await books.connect(source_url)
    rebuilt = await books.connect(target_url)
    try:
        quiet = await books.partition_positions(live, topics.commands) == {p: e for p, e in ends.items()}
        return await books.first_divergence(live, rebuilt, ends, compare_wallets=quiet)
    finally:
        await live.close()
        await rebuilt.close()
