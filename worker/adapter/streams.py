"""Reading whole topics: to their end (audit, replay), or live (tail)."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
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


@asynccontextmanager
async def _assigned(bootstrap: str, topic: str,
                    credentials: KafkaCredentials | None) -> AsyncIterator[tuple[AIOKafkaConsumer, list[TopicPartition]]]:  # fmt: skip
    """A consumer outside any group, assigned every partition of the topic, and those partitions."""
    partitions = await topic_partitions(bootstrap, topic, credentials)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, isolation_level="read_committed",
                                **kafka_client_options(credentials))  # fmt: skip
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in partitions]
        consumer.assign(tps)
        yield consumer, tps
    finally:
        await consumer.stop()


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
    async with _assigned(bootstrap, topic, credentials) as (consumer, tps):
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


async def follow(bootstrap: str, topic: str, from_beginning: bool = False,
                 credentials: KafkaCredentials | None = None) -> AsyncIterator[ConsumerRecord]:
    """Every record of the topic from now on (or from its beginning), as it arrives."""
    async with _assigned(bootstrap, topic, credentials) as (consumer, tps):
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
