"""Replay speed: commands per second rebuilt from the commands topic into an empty database.

Writes a fresh commands topic (its own prefix) with `--commands` records: opens and credits for
`--wallets` wallets, then charges (a share refused 402, a share retried as duplicates) and
reserve/capture pairs; then times `floorguard replay` of it into an empty database, and prints
one JSON line of results. Uses the services named by FLOORGUARD_KAFKA_BOOTSTRAP and
FLOORGUARD_DATABASE_URL, else the local stack.

    .venv/bin/python loadtest/replay_bench.py --commands 100000 --wallets 1000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import sys
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from aiokafka import AIOKafkaProducer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker.adapter.topics import create_topics  # noqa: E402
from worker.cli import settings as resolve_settings  # noqa: E402
from worker.config import Topics  # noqa: E402
from worker.replay import replay  # noqa: E402
from worker.store.migrate import migrate  # noqa: E402


def commands(count: int, wallets: int, rng: random.Random) -> list[dict]:
    names = [f"bench-{i}" for i in range(wallets)]
    made = [{"v": 1, "op": "open", "id": "o", "wallet": w} for w in names]
    made += [{"v": 1, "op": "credit", "id": "c", "wallet": w, "amount": 1_000_000} for w in names]
    n = 0
    while len(made) < count:
        wallet, n = rng.choice(names), n + 1
        kind = rng.random()
        if kind < 0.7:
            made.append({"v": 1, "op": "charge", "id": f"x{n}", "wallet": wallet, "amount": rng.randint(1, 3_000)})
        elif kind < 0.8 and made[-1]["op"] == "charge":
            made.append(dict(made[-1]))  # a retry: a duplicate
        else:
            made.append({"v": 1, "op": "reserve", "id": f"h{n}", "wallet": wallet, "amount": rng.randint(1, 500)})
            made.append({"v": 1, "op": "capture", "id": f"k{n}", "wallet": wallet, "hold": f"h{n}"})
    return made[:count]


async def produce(bootstrap: str, topic: str, records: list[dict]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_batch_size=262_144)
    await producer.start()
    try:
        futures = [await producer.send(topic, json.dumps(r).encode(), key=r["wallet"].encode()) for r in records]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commands", type=int, default=100_000)
    parser.add_argument("--wallets", type=int, default=1_000)
    parser.add_argument("--partitions", type=int, default=8)
    args = parser.parse_args()
    current = resolve_settings()
    await migrate(current.database_url)  # the source ledger, whose price table a replay copies
    topics = Topics(f"bench-{uuid.uuid4().hex[:8]}")
    await create_topics(current.kafka_bootstrap, topics, args.partitions)
    records = commands(args.commands, args.wallets, random.Random(1))
    await produce(current.kafka_bootstrap, topics.commands, records)
    name = f"floorguard_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(current.database_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    target = urlunsplit(urlsplit(current.database_url)._replace(path=f"/{name}"))
    try:
        result = await replay(current.kafka_bootstrap, topics, current.database_url, target,
                              master_secret=current.master_secret)
    finally:
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()
    print(json.dumps({"commands": result.commands, "seconds": round(result.seconds, 2),
                      "commands_per_s": round(result.rate_per_s), "wallets": args.wallets,
                      "partitions": args.partitions, "python": platform.python_version()}))  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
