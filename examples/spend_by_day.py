"""An example consumer of floorguard's events: spend per wallet, per day and per op, in SQLite.

The pattern to copy: the events topic is delivered at least once, so the read model records each
`(wallet, seq)` it has applied, in the same transaction as the change it makes. A repeat is then
a no-op, whether it comes from a redelivery, a restart or a second pass over the topic.

    python examples/spend_by_day.py --bootstrap 127.0.0.1:29092 --db spend.sqlite3 [--follow]

Spend is what left the wallet: accepted `charge` and `capture` amounts. Credits are counted apart.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

SCHEMA = """
CREATE TABLE IF NOT EXISTS applied (wallet TEXT NOT NULL, seq INTEGER NOT NULL, PRIMARY KEY (wallet, seq));
CREATE TABLE IF NOT EXISTS spend (
    wallet TEXT NOT NULL, day TEXT NOT NULL, op TEXT NOT NULL, amount INTEGER NOT NULL, decisions INTEGER NOT NULL,
    PRIMARY KEY (wallet, day, op)
);
"""
MONEY_OPS = ("charge", "capture", "credit")


def apply(db: sqlite3.Connection, event: dict) -> bool:
    """Apply one event exactly once; False when it was applied before."""
    with db:  # one transaction: the dedupe row and the change commit together or not at all
        fresh = db.execute("INSERT OR IGNORE INTO applied VALUES (?, ?)", (event["wallet"], event["seq"])).rowcount
        if not fresh:
            return False
        if event["ok"] and event["op"] in MONEY_OPS:
            db.execute(
                "INSERT INTO spend VALUES (?, ?, ?, ?, 1) ON CONFLICT (wallet, day, op) "
                "DO UPDATE SET amount = amount + excluded.amount, decisions = decisions + 1",
                (event["wallet"], event["at"][:10], event["op"], event["amount"]),
            )
        return True


async def consume(bootstrap: str, topic: str, db: sqlite3.Connection, follow: bool) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        (described,) = await admin.describe_topics([topic])
    finally:
        await admin.close()
    partitions = [TopicPartition(topic, p["partition"]) for p in described["partitions"]]
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    applied = 0
    try:
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)  # the dedupe table makes a full pass safe
        ends = await consumer.end_offsets(partitions)
        while True:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                applied += sum(apply(db, json.loads(record.value)) for record in records)
            if not follow and all([await consumer.position(tp) >= ends[tp] for tp in partitions]):
                return applied
    finally:
        await consumer.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", default="floorguard.events")
    parser.add_argument("--db", default="spend.sqlite3")
    parser.add_argument("--follow", action="store_true", help="keep going as new events arrive")
    args = parser.parse_args()
    db = sqlite3.connect(args.db)
    db.executescript(SCHEMA)
    applied = asyncio.run(consume(args.bootstrap, args.topic, db, args.follow))
    print(f"applied {applied} new events")
    for wallet, day, op, amount, decisions in db.execute("SELECT * FROM spend ORDER BY wallet, day, op"):
        print(f"{wallet:<24} {day} {op:<8} {amount:>16,} in {decisions} decisions")


if __name__ == "__main__":
    main()
