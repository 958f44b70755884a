"""The publisher against the real broker: a producer that stopped for good is replaced."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import OutOfOrderSequenceNumber
from faststream.kafka import KafkaBroker

from worker.adapter import metrics
from worker.adapter.app import _producer, _renewer
from worker.adapter.publisher import Publisher, stopped_for_good
from worker.core.outgoing import Outgoing

READ_TIMEOUT_S = 30


async def _end_sender_with(producer, error: BaseException) -> None:
    """What aiokafka's sender does on OutOfOrderSequenceNumber: its task ends with the error, and
    every batch pending or added later fails with it (`Sender._fail_all`, whose other half, for a
    producer without transactions, fails in aiokafka 0.14 itself and is only logged)."""
    sender = producer._sender
    sender.sender_task.cancel()
    await asyncio.gather(sender.sender_task, return_exceptions=True)

    async def failed() -> None:
        raise error

    sender._sender_task = asyncio.ensure_future(failed())
    await asyncio.gather(sender.sender_task, return_exceptions=True)
    producer._message_accumulator.fail_all(error)


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


async def test_a_producer_stopped_for_good_is_replaced_and_the_next_publish_lands(settings):
    broker = KafkaBroker(settings.kafka_bootstrap, acks="all", enable_idempotence=True)
    await broker.connect()
    try:
        publisher = Publisher(lambda: _producer(broker), settings.topics.dlq, _renewer(broker))

        def event(n: int) -> Outgoing:
            return Outgoing(settings.topics.events, None, b"w", b'{"n":%d}' % n, ())

        await publisher.publish([event(1)])
        dead = _producer(broker)
        await _end_sender_with(dead, OutOfOrderSequenceNumber())
        renewed = metrics.PRODUCERS_RENEWED._value.get()
        with pytest.raises(OutOfOrderSequenceNumber):  # this publish fails; its caller keeps the records
            await publisher.publish([event(2)])
        assert _producer(broker) is not dead and not stopped_for_good(_producer(broker))
        assert metrics.PRODUCERS_RENEWED._value.get() == renewed + 1
        await publisher.publish([event(2)])  # as the outbox sends it again
        assert sorted(await _values(settings.kafka_bootstrap, settings.topics.events, settings.partitions, 2)) == [
            b'{"n":1}', b'{"n":2}']  # fmt: skip
    finally:
        await broker.stop()
