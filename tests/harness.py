"""Load for the end-to-end tests: many producers, one reader of every reply, checks on the books."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from dataclasses import dataclass, field

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from worker.config import Settings

WAIT_S_MAX = 240


@dataclass
class Replies:
    """Every record of a topic from now on, by correlation id (repeats kept, to count them)."""

    bootstrap: str
    topic: str
    partitions: int
    received: dict[str, list[dict]] = field(default_factory=dict)
    _consumer: AIOKafkaConsumer | None = None
    _task: asyncio.Task | None = None

    async def start(self) -> None:
        self._consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False)
        await self._consumer.start()
        parts = [TopicPartition(self.topic, p) for p in range(self.partitions)]
        self._consumer.assign(parts)
        await self._consumer.seek_to_beginning(*parts)
        for tp in parts:
            await self._consumer.position(tp)
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while True:
            for records in (await self._consumer.getmany(timeout_ms=100)).values():
                for r in records:
                    key = dict(r.headers).get("correlation_id", b"").decode()
                    self.received.setdefault(key, []).append(json.loads(r.value))

    async def wait_for(self, correlation_ids: set[str], timeout_s: float = WAIT_S_MAX) -> None:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not correlation_ids <= self.received.keys():
            missing = len(correlation_ids - self.received.keys())
            assert asyncio.get_running_loop().time() < deadline, f"{missing} replies missing"
            await asyncio.sleep(0.2)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._consumer:
            await self._consumer.stop()


async def events(settings: Settings, count_at_least: int, timeout_s: float = WAIT_S_MAX) -> list[dict]:
    """Every event on the events topic, read until at least `count_at_least` arrived."""
    collector = Replies(settings.kafka_bootstrap, settings.topics.events, settings.partitions)
    await collector.start()
    try:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while sum(map(len, collector.received.values())) < count_at_least:
            assert asyncio.get_running_loop().time() < deadline, "events missing"
            await asyncio.sleep(0.2)
        await asyncio.sleep(1)  # let stragglers (repeats) in too
        return [event for batch in collector.received.values() for event in batch]
    finally:
        await collector.stop()


async def send_all(settings: Settings, commands: list[dict], producers: int, tag: str = "") -> None:
    """Send each command (correlation id: its id + tag) from `producers` concurrent producers."""
    clients = [AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", linger_ms=2)
               for _ in range(producers)]  # fmt: skip
    await asyncio.gather(*(c.start() for c in clients))
    try:
        async def run(client: AIOKafkaProducer, share: list[dict]) -> None:
            futures = [await client.send(settings.topics.commands, json.dumps(c).encode(), key=c["wallet"].encode(),
                                         headers=[("reply_to", settings.topics.replies.encode()),
                                                  ("correlation_id", (c["id"] + tag).encode())])
                       for c in share]  # fmt: skip
            await asyncio.gather(*futures)

        await asyncio.gather(*(run(c, commands[i::producers]) for i, c in enumerate(clients)))
    finally:
        await asyncio.gather(*(c.stop() for c in clients))


async def books(database_url: str) -> tuple[dict[str, dict], Counter]:
    """The wallets, and how many stored decisions each (wallet, id) has (must be one)."""
    connection = await asyncpg.connect(database_url)
    try:
        for _ in range(100):  # replies can arrive a moment before their outbox rows are deleted
            if await connection.fetchval("SELECT count(*) FROM outbox") == 0:
                break
            await asyncio.sleep(0.1)
        wallets = {r["wallet"]: dict(r) for r in await connection.fetch("SELECT * FROM wallets")}
        rows = await connection.fetch("SELECT wallet, id, seq FROM decisions")
        outbox = await connection.fetchval("SELECT count(*) FROM outbox")
    finally:
        await connection.close()
    counts = Counter((r["wallet"], r["id"]) for r in rows)
    for name, wallet in wallets.items():
        seqs = sorted(r["seq"] for r in rows if r["wallet"] == name)
        assert seqs == list(range(1, wallet["seq"] + 1)), f"{name}: seq gaps"
    assert outbox == 0, f"{outbox} outbox rows never published"
    return wallets, counts
