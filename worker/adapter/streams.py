"""Reading whole topics: to their end (audit, replay), or live (tail)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from worker.config import KafkaCredentials, kafka_client_options

FETCH_RECORDS_MAX = 5_000
FETCH_WAIT_MS = 200
ADMIN_TIMEOUT_MS = 30_000


async def topic_partitions(bootstrap: str, topic: str, credentials: KafkaCredentials | None = None) -> list[int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=ADMIN_TIMEOUT_MS,
                                **kafka_client_options(credentials))  # fmt: skip
    await admin.start()
    try:
        (described,) = await admin.describe_topics([topic])
    finally:
        await admin.close()
    if described["error_code"] != 0:
        raise LookupError(f"topic {topic} does not exist")
    return sorted(p["partition"] for p in described["partitions"])


def _consumer(bootstrap: str, credentials: KafkaCredentials | None) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, isolation_level="read_committed",
                            **kafka_client_options(credentials))  # fmt: skip


async def read_to_end(
    bootstrap: str,
    topic: str,
    handle: Callable[[Sequence[ConsumerRecord]], Awaitable[None]],
    start_offsets: dict[int, int] | None = None,
    on_ends: Callable[[dict[int, int]], None] = lambda ends: None,
    credentials: KafkaCredentials | None = None,
) -> dict[int, int]:
    """Hand every record from the start (or `start_offsets`) to the end as it was when the call
    began, in batches of one partition each; return those end offsets."""
    partitions = await topic_partitions(bootstrap, topic, credentials)
    consumer = _consumer(bootstrap, credentials)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in partitions]
        consumer.assign(tps)
        ends = {tp.partition: offset for tp, offset in (await consumer.end_offsets(tps)).items()}
        on_ends(ends)
        for tp in tps:
            consumer.seek(tp, (start_offsets or {}).get(tp.partition, 0))
        remaining = {tp for tp in tps if await consumer.position(tp) < ends[tp.partition]}
        while remaining:
            fetched = await consumer.getmany(*remaining, timeout_ms=FETCH_WAIT_MS, max_records=FETCH_RECORDS_MAX)
            for tp, records in fetched.items():
                wanted = [r for r in records if r.offset < ends[tp.partition]]
                if wanted:
                    await handle(wanted)
            for tp in list(remaining):
                if await consumer.position(tp) >= ends[tp.partition]:
                    remaining.discard(tp)
        return ends
    finally:
        await consumer.stop()


async def follow(bootstrap: str, topic: str, from_beginning: bool = False,
                 credentials: KafkaCredentials | None = None) -> AsyncIterator[ConsumerRecord]:
    """Every record of the topic from now on (or from its beginning), as it arrives."""
    partitions = await topic_partitions(bootstrap, topic, credentials)
    consumer = _consumer(bootstrap, credentials)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in partitions]
        consumer.assign(tps)
        if from_beginning:
            await consumer.seek_to_beginning(*tps)
        else:
            await consumer.seek_to_end(*tps)
        for tp in tps:
            await consumer.position(tp)
        while True:
            for records in (await consumer.getmany(timeout_ms=FETCH_WAIT_MS)).values():
                for record in records:
                    yield record
            await asyncio.sleep(0)
    finally:
        await consumer.stop()
