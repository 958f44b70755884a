"""The publisher against the real broker: a producer the broker refuses for good is replaced."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import OutOfOrderSequenceNumber
from faststream.kafka import KafkaBroker

from worker.adapter import metrics
from worker.adapter.app import _producer, _renewer
from worker.adapter.publisher import Publisher, Undeliverable
from worker.core.outgoing import Outgoing

READ_TIMEOUT_S = 30


def _skip_sequence_numbers(producer, topic: str, partitions: int) -> None:
    """What a broker restart did to the worker's producer in `make chaos`: the next batch of each
    partition carries a sequence number past the one the broker expects, which it refuses with
    OutOfOrderSequenceNumber, as it refuses every later one."""
    for partition in range(partitions):
        producer._txn_manager.increment_sequence_number(TopicPartition(topic, partition), 5)


async def _values(bootstrap: str, topic: str, partitions: int, count: int) -> list[bytes]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest")
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, p) for p in range(partitions)])
        seen: list[bytes] = []
        async with asyncio.timeout(READ_TIMEOUT_S):
            while len(seen) < count:
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    seen += [record.value for record in records]
        return seen
    finally:
        await consumer.stop()


async def test_a_producer_the_broker_refuses_for_good_is_replaced_and_the_next_publish_lands(settings):
    broker = KafkaBroker(settings.kafka_bootstrap, acks="all", enable_idempotence=True)
    await broker.connect()
    try:
        publisher = Publisher(lambda: _producer(broker), settings.topics.dlq, _renewer(broker))

        def event(n: int) -> Outgoing:
            return Outgoing(settings.topics.events, None, b"w", b'{"n":%d}' % n, ())

        await publisher.publish([event(1)])
        spoiled_producer = _producer(broker)
        _skip_sequence_numbers(spoiled_producer, settings.topics.events, settings.partitions)
        renewed = metrics.PRODUCERS_RENEWED._value.get()
        with pytest.raises(OutOfOrderSequenceNumber):  # this publish fails; its caller keeps the records
            await publisher.publish([event(2)])
        assert _producer(broker) is not spoiled_producer
        assert metrics.PRODUCERS_RENEWED._value.get() == renewed + 1
        await publisher.publish([event(2)])  # as the outbox sends it again
        assert sorted(await _values(settings.kafka_bootstrap, settings.topics.events, settings.partitions, 2)) == [
            b'{"n":1}', b'{"n":2}']  # fmt: skip
    finally:
        await broker.stop()


async def test_a_reply_whose_topic_and_dead_letter_topic_are_both_missing_is_undeliverable(settings):
    """Not a crash of the placement arithmetic: the outbox keeps the records and the worker retries."""
    broker = KafkaBroker(settings.kafka_bootstrap, acks="all", enable_idempotence=True)
    await broker.connect()
    try:
        publisher = Publisher(lambda: _producer(broker), f"{settings.topics.dlq}-missing", _renewer(broker))
        reply = Outgoing(f"{settings.topics.replies}-missing", None, b"w", b'{"n":1}', ())
        with pytest.raises(Undeliverable, match="dead-letter topic"):
            await publisher.publish([reply])
    finally:
        await broker.stop()
