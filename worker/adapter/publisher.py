"""Publishes outbox records after their commit: at least once, never lost.

FastStream's `publish` takes a body to encode and headers as text (and costs about 40 µs a record,
by issue 10's figures); the outbox holds finished records (exact bytes, binary headers of a dead
letter), so they go through the aiokafka producer that FastStream's broker owns and has already
connected, a produce batch per topic partition (`create_batch`/`send_batch`) rather than a `send`
per record. With native/ installed, each batch's bytes are written in one call (`record_batch`)
instead of an `append` per record, and handed to the producer behind aiokafka's batch builder's
interface (`_WrittenBatch`), which sets the producer's id, epoch and sequence before it sends.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    InvalidProducerEpoch,
    KafkaError,
    OutOfOrderSequenceNumber,
    ProducerFenced,
    UnknownProducerId,
)

from worker.core.outgoing import Outgoing
from worker.core.placement import partition_of

try:
    from floorguard_native import finish as finish_batch, record_batch
except ImportError:  # a worker installed without native/ (or an older build of it): a record at a time
    finish_batch = record_batch = None

SEND_TIMEOUT_S = 30
TOPIC_CACHE_TTL_S = 30.0  # how long a topic's partitions are taken as known
# How long a topic's absence is: a reply topic an agent creates just before it sends must not be
# taken as missing (its replies dead-lettered) for long because the broker had not yet listed it.
TOPIC_ABSENT_TTL_S = 1.0
TOPIC_CACHE_SIZE_MAX = 10_000
LOG_INTERVAL_S = 10.0  # a sender's bad reply addresses are logged once per interval, not per record
log = logging.getLogger("floorguard.publisher")


class _Sparse:
    """A warning given at most once per interval, with how many like it were held back: whoever
    can send commands must not be able to fill the worker's disk with its log."""

    def __init__(self, interval_s: float = LOG_INTERVAL_S) -> None:
        self._interval_s = interval_s
        self._last_s = -interval_s
        self._held = 0

    def warning(self, message: str, *args: object) -> None:
        now_s = time.monotonic()
        if now_s - self._last_s < self._interval_s:
            self._held += 1
            return
        held, self._held, self._last_s = self._held, 0, now_s
        log.warning(message + (f" ({held} more like it since the last such line)" if held else ""), *args)


class Undeliverable(Exception):
    pass


# The broker's answers after which an idempotent producer never sends to the partition again:
# aiokafka fails the batch and goes on with the next sequence number, which the broker refuses the
# same way, for good (Java's producer would take a new epoch; aiokafka 0.14 does not).
_SPOILING = (OutOfOrderSequenceNumber, UnknownProducerId, InvalidProducerEpoch, ProducerFenced)


def spoiled(producer: AIOKafkaProducer, error: BaseException) -> bool:
    """Whether only a new producer, with a new producer id, can send again after this error.

    Seen in `make chaos` after a broker restart: every publish failed with OutOfOrderSequenceNumber
    for minutes (a batch the broker had not kept, and each later one a sequence past it). Also when
    the producer's sender has ended (aiokafka ends it on some errors and fails every later send)."""
    task = producer._sender.sender_task  # the sender is aiokafka's; its task has no public accessor
    return isinstance(error, _SPOILING) or (task is not None and task.done())


class _WrittenBatch:
    """aiokafka's `BatchBuilder`, as its producer uses one, over a batch written whole by
    native/'s `record_batch`: closed, its records counted, its bytes finished (the producer's
    fields and the CRC) when the producer sets them, or with aiokafka's defaults when it does not."""

    __slots__ = ("_data", "_count", "_finished")

    def __init__(self, data: bytearray, count: int) -> None:
        self._data = data
        self._count = count
        self._finished = False

    def append(self, *, timestamp: int | None, key: bytes | None, value: bytes | None, headers: Sequence = ()) -> None:
        return None  # full: written whole

    def close(self) -> None:
        pass

    def closed(self) -> bool:
        return True

    def record_count(self) -> int:
        return self._count

    def size(self) -> int:
        return len(self._data)

    def _set_producer_state(self, producer_id: int, producer_epoch: int, base_sequence: int) -> None:
        finish_batch(self._data, producer_id, producer_epoch, base_sequence)
        self._finished = True

    def _build(self) -> bytearray:
        if not self._finished:
            self._set_producer_state(-1, -1, 0)  # a producer without idempotence: aiokafka's defaults
        return self._data


class Publisher:
    def __init__(self, producer: Callable[[], AIOKafkaProducer], dlq_topic: str,
                 renew: Callable[[AIOKafkaProducer], Awaitable[None]] | None = None, *,
                 batch_bytes_max: int | None = None) -> None:  # fmt: skip
        """`batch_bytes_max`: the producer's batch size, when native/ is to write the batches."""
        self._producer_of = producer  # the broker's producer exists only once the broker runs
        self._batch_bytes_max = batch_bytes_max if record_batch is not None else None
        self._dlq_topic = dlq_topic
        self._renew = renew  # puts a new producer in the place of a `spoiled` one
        self._topics: dict[str, tuple[float, set[int]]] = {}  # topic -> (checked at, partitions)
        self._placed_by_key = _Sparse()
        self._dead_lettered = _Sparse()

    @property
    def _producer(self) -> AIOKafkaProducer:
        return self._producer_of()

    async def publish(self, records: Sequence[Outgoing]) -> None:
        """Send every record and wait for the broker's acknowledgement of all of them.

        A reply whose topic or partition does not exist goes to the dead-letter topic instead,
        with the reason; any other failure raises, and the caller keeps the records to retry. A
        producer that failed for good is replaced first, so that the retry can succeed.
        """
        producer = self._producer
        try:
            await self._publish(records, producer)
        except Exception as error:
            if self._renew is not None and spoiled(producer, error):
                await self._renew(producer)
            raise

    async def _publish(self, records: Sequence[Outgoing], producer: AIOKafkaProducer) -> None:
        batches: dict[tuple[str, int], list[Outgoing]] = {}
        known: dict[str, int] = {}  # topic -> partition count, for topics whose every record is deliverable
        for record in records:
            count = known.get(record.topic)
            if count is None or record.partition is not None:
                record = await self._deliverable(record)
                count = len(await self._partitions(record.topic))
                if record.partition is None:
                    known[record.topic] = count
            partition = record.partition if record.partition is not None else self._place(record.key, count)
            batches.setdefault((record.topic, partition), []).append(record)
        futures = []
        now_ms = int(time.time() * 1000)
        for (topic, partition), batch in batches.items():
            for built in self._built(producer, batch, now_ms):
                futures.append(await producer.send_batch(built, topic, partition=partition))
        await asyncio.wait_for(asyncio.gather(*futures), SEND_TIMEOUT_S)

    def _built(self, producer: AIOKafkaProducer, batch: list[Outgoing], now_ms: int) -> Iterator[Any]:
        """A topic partition's records as produce batches, each as full as the producer's size allows:
        written whole by native/, or filled by aiokafka's builder a record at a time."""
        if self._batch_bytes_max is not None:
            start = 0
            while start < len(batch):
                data, end = record_batch(batch, start, now_ms, self._batch_bytes_max)
                yield _WrittenBatch(data, end - start)
                start = end
            return
        builder = producer.create_batch()
        for record in batch:
            headers = list(record.headers)  # the batch builder takes a list, nothing else
            if builder.append(key=record.key, value=record.value, timestamp=None, headers=headers) is None:
                yield builder  # full: the next
                builder = producer.create_batch()
                if builder.append(key=record.key, value=record.value, timestamp=None, headers=headers) is None:
                    raise Undeliverable(f"a record of {len(record.value)} bytes exceeds a produce batch")
        yield builder

    @staticmethod
    def _place(key: bytes | None, count: int) -> int:
        """The partition Kafka's default partitioner picks for the key, as every client does (a
        record without a key, a dead letter's, goes to any)."""
        return random.randrange(count) if key is None else partition_of(key, count)

    async def _deliverable(self, record: Outgoing) -> Outgoing:
        try:
            partitions = await self._partitions(record.topic)
        except (KafkaError, asyncio.TimeoutError) as error:
            raise Undeliverable(f"metadata of {record.topic}: {error!r}") from error
        if partitions and (record.partition is None or record.partition in partitions):
            return record
        if partitions:
            # The decision never depends on broker metadata (replay must reproduce it), so a
            # reply_partition the topic lacks only changes where the reply lands: placed by key.
            self._placed_by_key.warning("reply topic %s has no partition %s: reply placed by key", record.topic,
                                        record.partition)  # fmt: skip
            return Outgoing(record.topic, None, record.key, record.value, record.headers)
        if record.topic == self._dlq_topic:
            raise Undeliverable(f"the dead-letter topic {record.topic} is missing")
        if not await self._partitions(self._dlq_topic):
            raise Undeliverable(f"reply topic {record.topic} and the dead-letter topic {self._dlq_topic} are missing")
        reason = f"reply topic {record.topic} does not exist"
        self._dead_lettered.warning("reply sent to the dead-letter topic: %s", reason)
        headers = (*record.headers, ("reason", reason.encode()), ("reply_to", record.topic.encode()))
        return Outgoing(self._dlq_topic, None, record.key, record.value, headers)

    async def _partitions(self, topic: str) -> set[int]:
        """The topic's partitions, from a cache refreshed every TOPIC_CACHE_TTL_S; empty: no such topic."""
        now_s = time.monotonic()
        cached = self._topics.get(topic)
        if cached is not None and now_s - cached[0] < (TOPIC_CACHE_TTL_S if cached[1] else TOPIC_ABSENT_TTL_S):
            return cached[1]
        partitions = self._producer.client.cluster.partitions_for_topic(topic)
        if partitions is None:
            # Not tracked by the producer yet: ask the broker, without making the producer track a
            # name that may not exist (a reply_to is whatever a sender wrote).
            metadata = await asyncio.wait_for(self._producer.client.fetch_all_metadata(), SEND_TIMEOUT_S)
            partitions = metadata.partitions_for_topic(topic)
        if len(self._topics) >= TOPIC_CACHE_SIZE_MAX:
            self._topics.clear()
        self._topics[topic] = (now_s, set(partitions or ()))
        return self._topics[topic][1]
