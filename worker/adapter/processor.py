"""Decides each partition's share of a consumed batch, in order, exactly once.

The consumer's position is not trusted: the database holds each partition's next offset, read on
assignment and advanced by each batch's transaction only from the value this worker last saw.
A worker that lost a partition meets a different stored offset, rolls back, and lets go.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import IllegalStateError, KafkaError

from worker import failpoints
from worker.adapter import metrics
from worker.config import Topics
from worker.core.model import Parsed, Record
from worker.core.outgoing import Outgoing, rendered
from worker.core.parse import parse
from worker.adapter.publisher import Publisher, Undeliverable
from worker.store.store import TRANSIENT_ERRORS, Committed, Fenced, Outbox, PartitionBatch, Store
from worker.sweeper import BrokerClock

# A light fetch is written in one transaction over all its partitions: one flush, few round trips,
# the lowest latency. A heavy one is written one transaction per partition, side by side on the
# pool's connections, so that PostgreSQL works on both cores (measured on 2 cores: one transaction
# for everything answered about 30% fewer commands per second at saturation).
ONE_TRANSACTION_RECORDS_MAX = 256
INFRA_RETRIES_MAX = 8
INFRA_BACKOFF_FIRST_S = 0.1
INFRA_BACKOFF_MAX_S = 5.0
# Faults of the infrastructure, retried; anything else is a bug and stops the worker.
INFRA_ERRORS = (*TRANSIENT_ERRORS, OSError, asyncio.TimeoutError, KafkaError, Undeliverable)

log = logging.getLogger("floorguard.worker")


class Processor:
    def __init__(self, store: Callable[[], Store], publisher: Publisher, topics: Topics,
                 consumer: Callable[[], AIOKafkaConsumer | None], clock: BrokerClock) -> None:  # fmt: skip
        self._clock = clock
        self._store_of = store  # connected in the application's lifespan
        self._publisher = publisher
        self._topics = topics
        self._consumer = consumer
        self._forbidden_reply_topics = (topics.commands, topics.events, topics.dlq)
        self._seen: dict[int, int] = {}  # partition -> next offset this worker last saw stored
        self._unpublished: set[int] = set()  # partitions whose outbox may hold unsent records
        self._rewound: dict[int, int] = {}  # partition -> offset it was last sought back to
        # Outbox rows the broker acknowledged are deleted by the partition's next batch transaction,
        # or at once when none is under way: under load that saves a commit per batch.
        self._published: dict[int, list[int]] = {}  # partition -> acknowledged outbox rows to delete
        self._applying: set[int] = set()  # partitions whose batch transaction is under way
        self._inflight: dict[int, asyncio.Task[None]] = {}  # partition -> its batch being published
        # Held while a batch is decided, so that a rebalance hands partitions over between batches.
        self.busy = asyncio.Lock()
        # While the database is unreachable every assigned partition is paused at the consumer, so
        # that nothing is fetched (again and again) into memory; a probe resumes them when it answers.
        self._database_away_since_s: float | None = None
        self._probe: asyncio.Task[None] | None = None

    @property
    def _store(self) -> Store:
        return self._store_of()

    def render(self, decision) -> tuple[bytes, list[Outgoing]]:
        return rendered(decision, self._topics.events, self._topics.dlq, self._topics.commands)

    # --- rebalance ------------------------------------------------------------------------------

    async def assigned(self, partitions: Sequence[int]) -> None:
        """Resume each partition from the database, after publishing what its last owner left."""
        consumer = self._consumer()
        assert consumer is not None
        if self._database_away_since_s is not None:
            self._pause(consumer)  # a new assignment starts unpaused; the probe claims these
            return
        for partition in partitions:
            try:
                await self._resume(consumer, partition)
            except INFRA_ERRORS as error:
                # Claimed later, by the first batch that arrives for it (see `_ready`).
                log.warning("partition %d: cannot read its position yet (%r)", partition, error)
        for partition in partitions:
            if partition in self._seen:
                await self._heal(partition)

    async def _resume(self, consumer: AIOKafkaConsumer, partition: int) -> None:
        next_offset = await self._store.claim(self._topics.commands, partition)
        self._seen[partition] = next_offset
        consumer.seek(TopicPartition(self._topics.commands, partition), next_offset)
        self._unpublished.add(partition)
        log.info("partition %d assigned, resuming at offset %d", partition, next_offset)

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            await asyncio.gather(self._probe, return_exceptions=True)

    async def revoked(self, partitions: Sequence[int]) -> None:
        async with self.busy:
            await self.flush(partitions)
            for partition in partitions:
                self._seen.pop(partition, None)
                self._unpublished.discard(partition)

    async def _heal(self, partition: int) -> None:
        """Publish what a crash or an earlier owner left in the partition's outbox."""
        try:
            pending = await self._store.pending_outbox(self._topics.commands, partition)
            if pending:
                records = [record for outbox in pending for record in outbox.records]
                log.info("partition %d: publishing %d records left in the outbox", partition, len(records))
                await self._publisher.publish(records)
                await self._store.delete_outbox([outbox.position for outbox in pending])
        except INFRA_ERRORS as error:
            log.warning("partition %d: outbox not published yet (%r)", partition, error)
            return
        self._unpublished.discard(partition)

    # --- batches --------------------------------------------------------------------------------

    async def flush(self, partitions: Sequence[int] | None = None) -> None:
        """Wait for the batches in flight to the broker, then delete what they published."""
        chosen = list(self._inflight) if partitions is None else [p for p in partitions if p in self._inflight]
        await asyncio.gather(*(self._inflight.pop(p) for p in chosen), return_exceptions=True)
        for partition in list(self._published) if partitions is None else partitions:
            await self._tidy(partition)

    async def _tidy(self, partition: int) -> None:
        """Delete the partition's acknowledged outbox rows. A failure only means sent again later."""
        positions = self._published.pop(partition, [])
        if not positions:
            return
        try:
            await self._store.delete_outbox(positions)
        except INFRA_ERRORS as error:
            log.warning("partition %d: outbox rows not deleted yet (%r)", partition, error)
            self._published.setdefault(partition, []).extend(positions)

    def owned(self) -> list[int]:
        """The partitions this worker decides now: assigned to it and claimed from the database."""
        consumer = self._consumer()
        if consumer is None:
            return []
        assigned = {tp.partition for tp in consumer.assignment() if tp.topic == self._topics.commands}
        return sorted(p for p in self._seen if p in assigned)

    def sweepable(self) -> list[int]:
        """The partitions the sweeper watches: none while the database is away."""
        return [] if self._database_away_since_s is not None else self.owned()

    async def handle(self, records: Sequence[ConsumerRecord]) -> None:
        if records:
            self._clock.observe(max(raw.timestamp for raw in records))
        metrics.RECORDS_FETCHED.inc(len(records))
        by_partition: dict[int, list[Parsed]] = defaultdict(list)
        for raw in records:
            by_partition[raw.partition].append(parse(record_of(raw), self._forbidden_reply_topics))
        async with self.busy:
            ready = {p: batch for p, batch in by_partition.items() if await self._ready(p, batch)}
            if sum(len(batch) for batch in ready.values()) <= ONE_TRANSACTION_RECORDS_MAX:
                groups = [ready] if ready else []
            else:
                groups = [{p: batch} for p, batch in ready.items()]
            await asyncio.gather(*(self._apply(group) for group in groups))

    async def _ready(self, partition: int, batch: list[Parsed]) -> bool:
        """Whether the partition's batch can be decided now: owned, claimed, its outbox healed."""
        if partition not in self._seen:
            # Assigned while the database was away: claim it now and start from its stored offset.
            consumer = self._consumer()
            tp = TopicPartition(self._topics.commands, partition)
            if consumer is not None and tp in consumer.assignment():
                try:
                    await self._resume(consumer, partition)
                except INFRA_ERRORS as error:
                    consumer.seek(tp, batch[0].record.offset)  # keep the records coming back
                    self._database_away(error)
            return False
        if partition in self._unpublished:
            await self.flush([partition])
            await self._heal(partition)
        return not self._skipped_ahead(partition, batch)

    async def _apply(self, batches: dict[int, list[Parsed]]) -> None:
        """One transaction for the batches of every ready partition: one flush for all of them."""
        for batch in batches.values():
            metrics.BATCH_SIZE.observe(len(batch))
        delay_s = INFRA_BACKOFF_FIRST_S
        for attempt in range(1, INFRA_RETRIES_MAX + 1):
            owned = {p: batch for p, batch in batches.items() if p in self._seen}
            if not owned:
                return  # revoked since the fetch: the new owner decides these
            taken = {p: self._published.pop(p, []) for p in owned}
            self._applying.update(owned)
            try:
                began_s = time.monotonic()
                outcome = await self._store.apply_batches(
                    self._topics.commands, [PartitionBatch(p, self._seen[p], batch) for p, batch in owned.items()],
                    self.render, [position for positions in taken.values() for position in positions])  # fmt: skip
                metrics.COMMIT_SECONDS.observe(time.monotonic() - began_s)
            except INFRA_ERRORS as error:
                for p, positions in taken.items():
                    self._published.setdefault(p, []).extend(positions)
                self._database_away(error)
                log.debug("partitions %s: attempt %d failed: %r", sorted(owned), attempt, error)
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, INFRA_BACKOFF_MAX_S)
                continue
            finally:
                self._applying.difference_update(owned)
            self._database_back()
            metrics.HEALTH.last_batch_ok_s, metrics.HEALTH.last_error = time.monotonic(), None
            for partition, committed in outcome.items():
                if isinstance(committed, Fenced):
                    log.warning("partition %d fenced (%s): letting go of this batch", partition, committed)
                    await self._resume_from_store(partition)
                    continue
                self._seen[partition] = committed.next_offset
                _count(committed.decisions)
            failpoints.hit("after_commit")
            for partition, committed in outcome.items():
                if isinstance(committed, Committed):
                    await self._publish_after(partition, committed.outbox)
            return
        # Out of retries: let go of the batches. Their partitions stay paused; the probe seeks them
        # to their stored positions and resumes them once the database answers.
        consumer = self._consumer()
        for partition in batches:
            if partition in self._seen and consumer is not None:
                self._seek(consumer, partition, self._seen[partition])

    async def _publish_after(self, partition: int, outbox: Outbox | None) -> None:
        """Publishing overlaps the next batch's transaction: at most one batch of a partition is in
        flight to the broker, so replies keep their partition's order batch by batch."""
        previous = self._inflight.get(partition)
        if previous is not None:
            await previous
        self._inflight[partition] = asyncio.create_task(self._publish(partition, outbox))

    def _skipped_ahead(self, partition: int, batch: list[Parsed]) -> bool:
        """True when the batch starts past the stored position: some records were never decided.

        The consumer is sought back once. If it again starts at the same place, the gap is real
        (a transaction's marker takes an offset of its own) and the batch is decided.
        """
        seen = self._seen.get(partition)
        first = next((p.record.offset for p in batch if seen is not None and p.record.offset >= seen), None)
        if seen is None or first is None or first == seen or self._rewound.get(partition) == seen:
            return False
        log.warning("partition %d: batch starts at %d, stored position is %d; seeking back", partition, first, seen)
        self._rewound[partition] = seen
        consumer = self._consumer()
        if consumer is not None:
            consumer.seek(TopicPartition(self._topics.commands, partition), seen)
        return True

    async def _publish(self, partition: int, outbox: Outbox | None) -> None:
        """After the commit. A failure loses nothing: the row stays in the outbox until published."""
        if outbox is None:
            if partition not in self._applying:
                await self._tidy(partition)
            return
        count = len(outbox.records)
        metrics.OUTBOX_BACKLOG.inc(count)
        try:
            began_s = time.monotonic()
            await self._publisher.publish(outbox.records)
            metrics.PUBLISH_SECONDS.observe(time.monotonic() - began_s)
            # Until deleted, a crash only means the row is published again (at least once).
            self._published.setdefault(partition, []).append(outbox.position)
        except INFRA_ERRORS as error:
            log.warning("partition %d: publishing %d records failed (%r)", partition, count, error)
            self._unpublished.add(partition)
        finally:
            metrics.OUTBOX_BACKLOG.dec(count)
        if partition not in self._applying:
            await self._tidy(partition)

    # --- database outages ------------------------------------------------------------------------

    def _database_away(self, error: BaseException) -> None:
        """A transaction or a claim failed: stop fetching until the database answers a probe."""
        metrics.HEALTH.last_error = f"database: {error!r}"
        consumer = self._consumer()
        if self._database_away_since_s is None:
            self._database_away_since_s = time.monotonic()
            metrics.HEALTH.database_away_since_s = self._database_away_since_s
            metrics.DATABASE_UNREACHABLE.set(1)
            metrics.DATABASE_OUTAGES.inc()
            log.warning("database unreachable (%r): partitions paused until it answers", error)
        if consumer is not None:
            self._pause(consumer)
        if self._probe is None or self._probe.done():
            self._probe = asyncio.create_task(self._probe_database())
            self._probe.add_done_callback(_stop_if_failed)

    def _pause(self, consumer: AIOKafkaConsumer) -> None:
        mine = [tp for tp in consumer.assignment() if tp.topic == self._topics.commands]
        consumer.pause(*mine)  # fetched but undelivered records of these are dropped, not kept
        metrics.PAUSED_PARTITIONS.set(len(consumer.paused()))

    async def _probe_database(self) -> None:
        """Claims every assigned partition again, with bounded backoff, until the database answers;
        then seeks each to its stored position and resumes fetching."""
        delay_s = INFRA_BACKOFF_FIRST_S
        while self._database_away_since_s is not None:
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, INFRA_BACKOFF_MAX_S)
            async with self.busy:  # between batches, never beside one
                consumer = self._consumer()
                if self._database_away_since_s is None or consumer is None:
                    return
                try:
                    for tp in sorted(consumer.assignment()):
                        if tp.topic == self._topics.commands:
                            self._seen[tp.partition] = await self._store.claim(tp.topic, tp.partition)
                            self._unpublished.add(tp.partition)  # its outbox is published first
                            consumer.seek(tp, self._seen[tp.partition])
                except (*INFRA_ERRORS, IllegalStateError) as error:  # unreachable, or a partition just lost
                    metrics.HEALTH.last_error = f"database: {error!r}"
                    log.debug("database probe failed: %r", error)
                    continue
                self._database_back()

    def _database_back(self) -> None:
        if self._database_away_since_s is None:
            return
        away_s = time.monotonic() - self._database_away_since_s
        self._database_away_since_s = None
        metrics.HEALTH.database_away_since_s = None
        metrics.DATABASE_UNREACHABLE.set(0)
        consumer = self._consumer()
        if consumer is not None:
            consumer.resume(*consumer.paused())
            metrics.PAUSED_PARTITIONS.set(0)
        log.warning("database answers again after %.1f s: partitions resumed", away_s)

    def _seek(self, consumer: AIOKafkaConsumer, partition: int, offset: int) -> None:
        try:
            consumer.seek(TopicPartition(self._topics.commands, partition), offset)
        except IllegalStateError:
            self._seen.pop(partition, None)  # no longer ours

    def refresh_lag(self) -> None:
        """Per owned partition: records in the log not yet decided (high watermark − stored offset)."""
        consumer = self._consumer()
        metrics.CONSUMER_LAG.clear()
        if consumer is None:
            return
        assigned = consumer.assignment()  # a partition just revoked may still be in _seen
        for partition, next_offset in list(self._seen.items()):
            tp = TopicPartition(self._topics.commands, partition)
            if tp not in assigned:
                continue
            highwater = consumer.highwater(tp)
            if highwater is not None:
                metrics.CONSUMER_LAG.labels(str(partition)).set(max(highwater - next_offset, 0))

    async def _resume_from_store(self, partition: int) -> None:
        """Seek back to the stored position, so that what was not committed comes again."""
        consumer = self._consumer()
        try:
            next_offset = await self._store.claim(self._topics.commands, partition)
        except INFRA_ERRORS as error:
            log.warning("partition %d: cannot read its position (%r)", partition, error)
            next_offset = self._seen.get(partition)
        if next_offset is None or partition not in self._seen or consumer is None:
            return
        self._seen[partition] = next_offset
        try:
            consumer.seek(TopicPartition(self._topics.commands, partition), next_offset)
        except IllegalStateError:
            self._seen.pop(partition, None)  # no longer ours


class Rebalance(ConsumerRebalanceListener):
    """Hands assignment changes to the processor. aiokafka awaits these before fetching again."""

    def __init__(self, processor: Processor, commands_topic: str) -> None:
        self._processor = processor
        self._topic = commands_topic

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._processor.revoked([tp.partition for tp in revoked if tp.topic == self._topic])

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self._processor.assigned(sorted(tp.partition for tp in assigned if tp.topic == self._topic))


def _stop_if_failed(probe: asyncio.Task[None]) -> None:
    """A probe that died of anything but a retried fault would leave the partitions paused forever:
    a bug, so the worker stops (the supervisor or the operator starts it again)."""
    if not probe.cancelled() and probe.exception() is not None:
        log.critical("stopping the worker: the database probe failed", exc_info=probe.exception())
        os.kill(os.getpid(), signal.SIGTERM)


def _count(decisions) -> None:
    """Decisions by op and status: counted first, so that a batch touches each label once."""
    for (op, status), count in Counter((d.reply["op"], d.reply["status"]) for d in decisions).items():
        metrics.DECISIONS.labels(str(op), str(status)).inc(count)


def record_of(raw: ConsumerRecord) -> Record:
    headers = tuple((name if name.isascii() else _utf8(name), value if isinstance(value, bytes) else b"")
                    for name, value in raw.headers or ())  # fmt: skip
    return Record(raw.partition, raw.offset, raw.timestamp, raw.key, raw.value, headers)


def _utf8(name: str) -> str:
    """A header name as text that can be stored and sent again: bytes that were not UTF-8 (kept
    as surrogates by `fetch_guard`) become U+FFFD."""
    try:
        name.encode()
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return name
