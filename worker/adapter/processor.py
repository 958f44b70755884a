"""Decides each partition's share of a consumed batch, in order, exactly once.

The consumer's position is not trusted: the database holds each partition's next offset, read on
assignment and advanced by each batch's transaction only from the value this worker last saw.
A worker that lost a partition meets a different stored offset, rolls back, and lets go.

Everything the worker holds of one partition is one `Partition` object: its position, its phase,
the outbox rows the broker has acknowledged, the publish in flight, and the state its last batch
left (wallets and holds), which the next batch starts from instead of reading it again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import IllegalStateError, KafkaError

from worker import failpoints
from worker.adapter import metrics
from worker.config import LOOK_UP_ALL_RECORDS_DEFAULT, REFUSED_LOOK_UP_FACTOR, Topics
from worker.core.model import Parsed, PartitionState, Record
from worker.core.outgoing import Outgoing, rendered
from worker.core.native import HotPath, hot_path
from worker.core.recent import Recent
from worker.adapter.publisher import Publisher, Undeliverable
from worker.decider import AuthChanged, Decided, Decider
from worker.store.store import TRANSIENT_ERRORS, Committed, Fenced, Outbox, PartitionBatch, Store, StoredAlready
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


class Phase(Enum):
    CLAIMED = "claimed"  # its position read; what an earlier owner (or a crash) left in its outbox may be unsent
    READY = "ready"  # its outbox published: its batches are decided


@dataclass(slots=True, eq=False)
class Partition:
    """A commands partition this worker owns: assigned to it and claimed from the database."""

    number: int
    next_offset: int  # the stored position this worker last read or wrote
    phase: Phase = Phase.CLAIMED
    rewound_to: int | None = None  # the offset it was last sought back to (see `_skipped_ahead`)
    acknowledged: list[int] = field(default_factory=list)  # outbox rows the broker has, to delete
    committing: asyncio.Task[None] | None = None  # its last decided batch, being stored
    publishing: asyncio.Task[None] | None = None  # its last committed batch on its way (one publish per transaction)
    # What its batches decided so far (wallets, holds): the next batch starts from it, whether or
    # not the last one is committed yet. Dropped after anything that may have left it ahead of
    # the database (a failed or fenced commit): the next batch reads what it needs again.
    state: PartitionState | None = None
    decided_offset: int = -1  # where its decided batches end (`next_offset` once they are committed)
    generation: int = 0  # moves each time the state is dropped: what was decided on the old one is let go
    # One publish of what was left in its outbox at a time: the assignment, its first batch and
    # `tend` may each find it CLAIMED, and without it all of them published the same rows.
    healing: asyncio.Lock = field(default_factory=asyncio.Lock)
    # The ids its batches decided lately: only those are looked up for an earlier decision. Below
    # `look_up_below` (some records past its claim, or past a commit that found an id presumed
    # new stored already: `Settings.look_up_all_records`), every id is.
    recent: Recent = field(default_factory=Recent)
    look_up_below: int = -1

    def __post_init__(self) -> None:
        self.decided_offset = self.next_offset


class Processor:
    def __init__(self, store: Callable[[], Store], publisher: Publisher, topics: Topics,
                 consumer: Callable[[], AIOKafkaConsumer | None], clock: BrokerClock,
                 look_up_all_records: int = LOOK_UP_ALL_RECORDS_DEFAULT, hot: HotPath | None = None) -> None:  # fmt: skip
        self._clock = clock
        self.hot = hot or hot_path()
        self._look_up_all_records = look_up_all_records  # see worker/config.py
        self._store_of = store  # connected in the application's lifespan
        self._publisher = publisher
        self._topics = topics
        self._consumer = consumer
        self._forbidden_reply_topics = (topics.commands, topics.events, topics.dlq)
        self.partition_count: int | None = None  # of the commands topic, set in the lifespan (D33)
        self.stopping = False  # set on shutdown: nothing more is decided
        self._partitions: dict[int, Partition] = {}
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
        for number in partitions:
            try:
                await self._claim(consumer, number)
            except INFRA_ERRORS as error:
                # Claimed later, by the first batch that arrives for it (see `_ready`).
                log.warning("partition %d: cannot read its position yet (%r)", number, error)
        for number in partitions:
            if number in self._partitions:
                await self._heal(self._partitions[number])

    async def _claim(self, consumer: AIOKafkaConsumer, number: int) -> None:
        """Read the partition's stored position and seek there. Its outbox is published before its
        first batch is decided (`_heal`, from `assigned`, `_ready` or `tend`)."""
        next_offset = await self._store.claim(self._topics.commands, number)
        partition = self._partitions.get(number)
        if partition is None:
            partition = self._partitions[number] = Partition(number, next_offset)
        else:  # claimed again after an outage: what it holds in memory may be ahead of the database
            partition.next_offset, partition.phase = next_offset, Phase.CLAIMED
            partition.state, partition.decided_offset, partition.generation = None, next_offset, partition.generation + 1
            partition.rewound_to = None
        partition.look_up_below = max(partition.look_up_below, next_offset + self._look_up_all_records)
        consumer.seek(TopicPartition(self._topics.commands, number), next_offset)
        log.info("partition %d assigned, resuming at offset %d", number, next_offset)

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            await asyncio.gather(self._probe, return_exceptions=True)

    async def revoked(self, partitions: Sequence[int]) -> None:
        async with self.busy:
            await self.flush(partitions)
            for number in partitions:
                self._partitions.pop(number, None)

    async def _heal(self, partition: Partition) -> None:
        """Publish what a crash or an earlier owner left in the partition's outbox, once."""
        async with partition.healing:
            if partition.phase is Phase.CLAIMED:
                await self._publish_left(partition)

    async def _publish_left(self, partition: Partition) -> None:
        try:
            pending = await self._store.pending_outbox(self._topics.commands, partition.number)
            if pending:
                records = [record for outbox in pending for record in outbox.records]
                log.info("partition %d: publishing %d records left in the outbox", partition.number, len(records))
                await self._publisher.publish(records)
                await self._store.delete_outbox([outbox.position for outbox in pending])
        except INFRA_ERRORS as error:
            log.warning("partition %d: outbox not published yet (%r)", partition.number, error)
            return
        partition.phase = Phase.READY

    # --- batches --------------------------------------------------------------------------------

    async def flush(self, numbers: Sequence[int] | None = None) -> None:
        """Wait for the batches being stored and in flight to the broker, then delete what they published."""
        chosen = [self._partitions[n] for n in (self._partitions if numbers is None else numbers)
                  if n in self._partitions]  # fmt: skip
        await asyncio.gather(*{p.committing for p in chosen if p.committing is not None}, return_exceptions=True)
        await asyncio.gather(*{p.publishing for p in chosen if p.publishing is not None}, return_exceptions=True)
        for partition in chosen:
            partition.publishing = None
            await self._tidy(partition)

    async def _tidy(self, partition: Partition) -> None:
        """Delete the partition's acknowledged outbox rows. A failure only means sent again later."""
        positions, partition.acknowledged = partition.acknowledged, []
        if not positions:
            return
        try:
            await self._store.delete_outbox(positions)
        except INFRA_ERRORS as error:
            log.warning("partition %d: outbox rows not deleted yet (%r)", partition.number, error)
            partition.acknowledged.extend(positions)

    async def stop(self) -> None:
        """Decide nothing more, and store and publish what was decided, while the producer is up."""
        async with self.busy:  # a batch being decided now is decided whole
            self.stopping = True
        await self.flush()

    async def tend(self) -> None:
        """Delete the outbox rows the broker has acknowledged on partitions with no batch under way
        (one statement for all of them), and publish what partitions left in their outboxes (a
        failed publish, a fenced commit) when no batch of theirs comes along to do it first."""
        if self.stopping or self._database_away_since_s is not None:
            return
        async with self.busy:
            idle = [p for p in self._partitions.values() if p.acknowledged and p.committing is None]
            taken = {partition: partition.acknowledged for partition in idle}
            for partition in idle:
                partition.acknowledged = []
            try:
                await self._store.delete_outbox([position for positions in taken.values() for position in positions])
            except INFRA_ERRORS as error:
                log.warning("outbox rows not deleted yet (%r)", error)
                for partition, positions in taken.items():
                    partition.acknowledged.extend(positions)
            for partition in list(self._partitions.values()):
                if partition.phase is Phase.CLAIMED and self._partitions.get(partition.number) is partition:
                    await self.flush([partition.number])
                    await self._heal(partition)

    def owned(self) -> list[int]:
        """The partitions this worker decides now: assigned to it and claimed from the database."""
        consumer = self._consumer()
        if consumer is None:
            return []
        assigned = {tp.partition for tp in consumer.assignment() if tp.topic == self._topics.commands}
        return sorted(n for n in self._partitions if n in assigned)

    def sweepable(self) -> list[int]:
        """The partitions the sweeper watches: none while the database is away."""
        return [] if self._database_away_since_s is not None else self.owned()

    async def handle(self, records: Sequence[Record]) -> None:
        """A fetch's records, as the consumer hands them over (the core's `Record`s: fetch_guard)."""
        if not records or self.stopping:
            return  # stopping: what is not decided now is decided by the partitions' next owner
        self._clock.observe(max(record.timestamp_ms for record in records))
        metrics.RECORDS_FETCHED.inc(len(records))
        forbidden, count, parse = self._forbidden_reply_topics, self.partition_count, self.hot.parse
        by_partition: dict[int, list[Parsed]] = {}
        for record in records:
            batch = by_partition.get(record.partition)
            if batch is None:
                batch = by_partition[record.partition] = []
            batch.append(parse(record, forbidden, count))
        async with self.busy:
            if self.stopping:
                return
            ready = {}
            for number, batch in by_partition.items():
                generation = await self._ready(number, batch)
                if generation is not None:
                    ready[number] = (generation, batch)
            if sum(len(batch) for _, batch in ready.values()) <= ONE_TRANSACTION_RECORDS_MAX:
                groups = [ready] if ready else []
            else:
                groups = [{number: entry} for number, entry in ready.items()]
            await asyncio.gather(*(self._apply(group) for group in groups))

    async def _ready(self, number: int, batch: list[Parsed]) -> int | None:
        """The partition's generation when its batch can be decided now (owned, claimed, its outbox
        healed, the batch starting where the partition's decided batches end); else None. The batch
        is decided only if the generation has not moved by then: a commit that fails meanwhile
        seeks the partition back, and what was fetched before that is not what comes next."""
        partition = self._partitions.get(number)
        if partition is None:
            # Assigned while the database was away: claim it now and start from its stored offset.
            consumer = self._consumer()
            tp = TopicPartition(self._topics.commands, number)
            if consumer is not None and tp in consumer.assignment():
                try:
                    await self._claim(consumer, number)
                except INFRA_ERRORS as error:
                    consumer.seek(tp, batch[0].record.offset)  # keep the records coming back
                    self._database_away(error)
            return None
        if partition.phase is Phase.CLAIMED:
            await self.flush([number])
            await self._heal(partition)
            if self._partitions.get(number) is not partition:
                return None
        return None if self._skipped_ahead(partition, batch) else partition.generation

    async def _apply(self, batches: dict[int, tuple[int, list[Parsed]]]) -> None:
        """Decide the batches of these partitions, beside their previous batches' commit, then
        start their commit (one transaction for all of them) and return: the next fetch is decided
        while this one commits. A partition whose generation moved since `_ready` (a commit before
        this batch failed, or was fenced) is let go of: it was sought back, its records come again."""
        for _, batch in batches.values():
            metrics.BATCH_SIZE.observe(len(batch))
        decider = Decider(self._store, self.hot)
        delay_s = INFRA_BACKOFF_FIRST_S
        for attempt in range(1, INFRA_RETRIES_MAX + 1):
            owned = {partition: batch for number, (generation, batch) in batches.items()
                     if (partition := self._current(number, generation)) is not None}  # fmt: skip
            if not owned:
                return  # revoked or sought back since the fetch: these records come again, or go to the new owner
            try:
                decided = await decider.decide(self._topics.commands, [
                    PartitionBatch(p.number, p.decided_offset, batch, p.state, p.committing is not None,
                                   p.recent, look_up_all=p.decided_offset < p.look_up_below)
                    for p, batch in owned.items()])  # fmt: skip
                break
            except INFRA_ERRORS as error:
                # Nothing was decided: the carried states only gained rows read from the database.
                self._database_away(error)
                log.debug("partitions %s: attempt %d failed: %r", sorted(batches), attempt, error)
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, INFRA_BACKOFF_MAX_S)
        else:
            # Out of retries: let go of the batches. Their partitions stay paused; the probe seeks
            # them to their stored positions and resumes them once the database answers.
            for number, (generation, _) in batches.items():
                partition = self._current(number, generation)
                if partition is not None:
                    self._start_over(partition)
            return
        previous = {partition.committing for partition in owned if partition.committing is not None}
        if previous:
            await asyncio.wait(previous)  # a commit settles its own failures; a bug stops the worker
        current = {p for p in owned if self._current(p.number, batches[p.number][0]) is p}
        for partition in owned:
            if partition not in current:
                decided.writes = [w for w in decided.writes if w.partition != partition.number]
                decided.outcome.pop(partition.number, None)
        if not current:
            return
        for write in decided.writes:
            partition = self._partitions[write.partition]
            # The next batch is decided from here, whether or not this one is committed by then.
            partition.decided_offset, partition.state = write.next_offset, decided.states[write.partition]
        commit = asyncio.create_task(self._commit(decided, current))
        commit.add_done_callback(_stop_if_failed)
        for partition in current:
            partition.committing = commit

    async def _commit(self, decided: Decided, partitions: set[Partition]) -> None:
        """Store the decided batches (retrying the infrastructure's faults: the same decisions,
        from the same positions), then publish what they send."""
        delay_s = INFRA_BACKOFF_FIRST_S
        try:
            for attempt in range(1, INFRA_RETRIES_MAX + 1):
                owned = [p for p in partitions if self._partitions.get(p.number) is p]
                if not owned:
                    return  # revoked meanwhile: the new owner decides these
                taken = {partition: partition.acknowledged for partition in owned}
                for partition in owned:
                    partition.acknowledged = []
                try:
                    began_s = time.monotonic()
                    outcome = await Decider(self._store, self.hot).commit(
                        self._topics.commands, decided, self.render,
                        [position for positions in taken.values() for position in positions])  # fmt: skip
                    metrics.COMMIT_SECONDS.observe(time.monotonic() - began_s)
                except AuthChanged:
                    self._decide_again(taken)
                    log.info("partitions %s: keys or modes changed meanwhile; deciding again", sorted(decided.states))
                    return
                except StoredAlready:
                    if not decided.presumed:
                        raise  # every id was looked up, and one was stored all the same: a bug
                    metrics.DECIDED_AGAIN.inc()
                    for partition in taken:
                        partition.look_up_below = max(partition.look_up_below,
                                                      partition.decided_offset + REFUSED_LOOK_UP_FACTOR * self._look_up_all_records)  # fmt: skip
                    self._decide_again(taken)
                    log.info("partitions %s: an id presumed new was decided before; deciding again, every id "
                             "looked up", sorted(decided.states))  # fmt: skip
                    return
                except INFRA_ERRORS as error:
                    for partition, positions in taken.items():
                        partition.acknowledged.extend(positions)
                    self._database_away(error)
                    log.debug("partitions %s: attempt %d failed: %r", sorted(decided.states), attempt, error)
                    await asyncio.sleep(delay_s)
                    delay_s = min(delay_s * 2, INFRA_BACKOFF_MAX_S)
                    continue
                self._database_back()
                metrics.HEALTH.last_batch_ok_s, metrics.HEALTH.last_error = time.monotonic(), None
                for partition in owned:
                    committed = outcome.get(partition.number)
                    if isinstance(committed, Fenced):
                        log.warning("partition %d fenced (%s): letting go of this batch", partition.number, committed)
                        partition.phase = Phase.CLAIMED  # whatever was committed before is published first
                        await self._resume_from_store(partition)
                    elif committed is not None:
                        partition.next_offset = committed.next_offset
                        _count(committed.decisions)
                if any(isinstance(committed, Committed) and committed.outbox for committed in outcome.values()):
                    failpoints.hit("after_commit")  # a transaction stored records to publish
                await self._publish_after([(partition, committed.outbox) for partition in owned
                                           if isinstance(committed := outcome.get(partition.number), Committed)])  # fmt: skip
                return
            for partition in partitions:  # out of retries: the probe resumes them from the database
                if self._partitions.get(partition.number) is partition:
                    self._start_over(partition)
        finally:
            for partition in partitions:
                if partition.committing is asyncio.current_task():
                    partition.committing = None

    def _decide_again(self, taken: dict[Partition, list[int]]) -> None:
        """A commit that wrote nothing: its partitions keep their acknowledged outbox rows to delete
        and start over from their stored positions."""
        for partition, positions in taken.items():
            partition.acknowledged.extend(positions)
            self._start_over(partition)

    def _current(self, number: int, generation: int) -> Partition | None:
        """The partition, if this worker still owns it and has not sought it back since `generation`."""
        partition = self._partitions.get(number)
        return partition if partition is not None and partition.generation == generation else None

    def _start_over(self, partition: Partition) -> None:
        """Drop what the partition holds beyond the database (its state, its decided position) and
        seek back to its stored position: its records come again, and are decided afresh."""
        partition.state = None
        partition.generation += 1
        partition.decided_offset = partition.next_offset
        partition.rewound_to = None  # a seek of its own is no sign of a gap in the log
        consumer = self._consumer()
        if consumer is not None:
            self._seek(consumer, partition, partition.next_offset)

    async def _publish_after(self, committed: list[tuple[Partition, Outbox | None]]) -> None:
        """Publishing overlaps the next batch's transaction: at most one batch of a partition is in
        flight to the broker, so replies keep their partition's order batch by batch. What one
        transaction committed goes out as one publish, whatever the number of its partitions."""
        previous = {partition.publishing for partition, _ in committed if partition.publishing is not None}
        if previous:
            await asyncio.wait(previous)  # a failure is its own: the outbox keeps the rows
        sent = [(partition, outbox) for partition, outbox in committed if outbox is not None]
        task = asyncio.create_task(self._publish(sent)) if sent else None
        for partition, _ in committed:
            partition.publishing = task

    def _skipped_ahead(self, partition: Partition, batch: list[Parsed]) -> bool:
        """True when the batch starts past the stored position: some records were never decided.

        The consumer is sought back once. If it again starts at the same place, the gap is real
        (a transaction's marker takes an offset of its own) and the batch is decided.
        """
        seen = partition.decided_offset
        first = next((p.record.offset for p in batch if p.record.offset >= seen), None)
        if first is None or first == seen or partition.rewound_to == seen:
            return False
        log.warning("partition %d: batch starts at %d, stored position is %d; seeking back",
                    partition.number, first, seen)  # fmt: skip
        partition.rewound_to = seen
        consumer = self._consumer()
        if consumer is not None:
            consumer.seek(TopicPartition(self._topics.commands, partition.number), seen)
        return True

    async def _publish(self, sent: list[tuple[Partition, Outbox]]) -> None:
        """After the commit. A failure loses nothing: the rows stay in the outbox until published.
        A published row is deleted by its partition's next batch transaction, or by `tend` within a
        second when none comes: never by a statement of its own per batch."""
        records = [record for _, outbox in sent for record in outbox.records]
        count = len(records)
        metrics.OUTBOX_BACKLOG.inc(count)
        try:
            began_s = time.monotonic()
            await self._publisher.publish(records)
            metrics.PUBLISH_SECONDS.observe(time.monotonic() - began_s)
            # Until deleted, a crash only means the rows are published again (at least once).
            for partition, outbox in sent:
                partition.acknowledged.append(outbox.position)
        except Exception as error:  # whatever it was, the rows stay in the outbox and go again
            level = logging.WARNING if isinstance(error, INFRA_ERRORS) else logging.ERROR
            log.log(level, "partitions %s: publishing %d records failed (%r)", sorted(p.number for p, _ in sent),
                    count, error)  # fmt: skip
            for partition, _ in sent:
                partition.phase = Phase.CLAIMED  # its outbox is published again before its next batch
        finally:
            metrics.OUTBOX_BACKLOG.dec(count)

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
                            await self._claim(consumer, tp.partition)  # its outbox is healed before its first batch
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

    def _seek(self, consumer: AIOKafkaConsumer, partition: Partition, offset: int) -> None:
        try:
            consumer.seek(TopicPartition(self._topics.commands, partition.number), offset)
        except IllegalStateError:
            self._partitions.pop(partition.number, None)  # no longer ours

    def refresh_lag(self) -> None:
        """Per owned partition: records in the log not yet decided (high watermark − stored offset)."""
        consumer = self._consumer()
        metrics.CONSUMER_LAG.clear()
        if consumer is None:
            return
        assigned = consumer.assignment()  # a partition just revoked may still be listed
        for partition in list(self._partitions.values()):
            tp = TopicPartition(self._topics.commands, partition.number)
            if tp not in assigned:
                continue
            highwater = consumer.highwater(tp)
            if highwater is not None:
                metrics.CONSUMER_LAG.labels(str(partition.number)).set(max(highwater - partition.next_offset, 0))

    async def _resume_from_store(self, partition: Partition) -> None:
        """Seek back to the stored position, so that what was not committed comes again."""
        try:
            partition.next_offset = await self._store.claim(self._topics.commands, partition.number)
        except INFRA_ERRORS as error:
            log.warning("partition %d: cannot read its position (%r)", partition.number, error)
        if self._partitions.get(partition.number) is partition:
            self._start_over(partition)


class Rebalance(ConsumerRebalanceListener):
    """Hands assignment changes to the processor. aiokafka awaits these before fetching again."""

    def __init__(self, processor: Processor, commands_topic: str) -> None:
        self._processor = processor
        self._topic = commands_topic

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._processor.revoked([tp.partition for tp in revoked if tp.topic == self._topic])

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self._processor.assigned(sorted(tp.partition for tp in assigned if tp.topic == self._topic))


def _stop_if_failed(task: asyncio.Task[None]) -> None:
    """A commit or a probe that died of anything but a retried fault is a bug (a commit the
    database refused, partitions left paused for ever): the worker stops, and the supervisor or
    the operator starts it again. Nothing is lost: the stored positions say where to resume."""
    if not task.cancelled() and task.exception() is not None:
        log.critical("stopping the worker: %s failed", task.get_coro().__qualname__, exc_info=task.exception())
        os.kill(os.getpid(), signal.SIGTERM)


def _count(decisions) -> None:
    """Decisions by op and status: counted first, so that a batch touches each label once."""
    for (op, status), count in Counter((d.reply["op"], d.reply["status"]) for d in decisions).items():
        metrics.DECISIONS.labels(str(op), str(status)).inc(count)
