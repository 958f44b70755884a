"""The log is the ledger: a mixed workload replayed into a second database is identical, and the
auditor catches a tampered balance and a missing event."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import time
import uuid

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from floorguard import Refused, Usage
from tests.conftest import ROOT, _with_database, skewed_clock, wait_until_serving, worker_env
from tests.harness import books, events
from tests.test_holds import add_price


def floorguard(settings, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "worker.cli", *args], cwd=ROOT, env=worker_env(settings),
                          capture_output=True, text=True, timeout=300)  # fmt: skip


async def mixed_workload(ledger, settings) -> None:
    """Charges, retries, conflicts, 402s, usage at two prices, holds captured, released, expired,
    on wallets spread over every partition."""
    rng = random.Random(5)
    wallets = [f"mix-{i}" for i in range(24)]
    await asyncio.gather(*(ledger.open(w, floor=-rng.randint(0, 50)) for w in wallets))
    await asyncio.gather(*(ledger.credit(w, rng.randint(200, 2_000)) for w in wallets))
    await add_price(settings, "mix-model", int(time.time() * 1000) + 5_200, input_price=2_000, output_price=9_000)
    await asyncio.sleep(5.5)

    async def quietly(call):
        try:
            return await call
        except Refused as refused:
            return refused.reply

    async def agent(wallet: str) -> None:
        for step in range(12):
            kind = rng.random()
            if kind < 0.4:
                command_id = f"{wallet}-c{step}"
                await quietly(ledger.charge(wallet, rng.randint(1, 300), id=command_id))
                await quietly(ledger.charge(wallet, 1, id=command_id))  # conflict, or the duplicate's refusal
            elif kind < 0.55:
                await quietly(ledger.charge_usage(wallet, Usage("mix-model", rng.randint(0, 90_000), rng.randint(0, 9_000))))
            elif kind < 0.7:
                hold = await quietly(ledger.reserve(wallet, rng.randint(1, 200), ttl_ms=rng.choice([300, 60_000])))
                if hold.ok and rng.random() < 0.5:
                    await quietly(ledger.capture(wallet, hold.hold, rng.randint(0, 250)))
            elif kind < 0.8:
                hold = await quietly(ledger.reserve(wallet, rng.randint(1, 200)))
                if hold.ok:
                    await quietly(ledger.extend(wallet, hold.hold, rng.randint(1, 50)))
                    await quietly(ledger.release(wallet, hold.hold))
            else:
                await quietly(ledger.credit(wallet, rng.randint(1, 100)))

    await asyncio.gather(*(agent(w) for w in wallets))
    # A later price while the ledger runs: earlier decisions must replay at the earlier one.
    await add_price(settings, "mix-model", int(time.time() * 1000) + 5_200, input_price=4_000, output_price=1)
    await asyncio.sleep(5.5)
    await asyncio.gather(*(quietly(ledger.charge_usage(w, Usage("mix-model", 1_000, 1_000))) for w in wallets))


async def settle(settings) -> None:
    """Until the short holds have expired and the outbox is empty."""
    connection = await asyncpg.connect(settings.database_url)
    try:
        for _ in range(200):
            expiring = await connection.fetchval("SELECT count(*) FROM holds WHERE open AND expires_at_ms < "
                                                 "(extract(epoch FROM now()) * 1000)::bigint - 1000")  # fmt: skip
            outbox = await connection.fetchval("SELECT count(*) FROM outbox")
            if expiring == 0 and outbox == 0:
                return
            await asyncio.sleep(0.2)
        raise AssertionError(f"{expiring} expired holds still open, {outbox} outbox rows")
    finally:
        await connection.close()


async def empty_database(services_url: str) -> str:
    name = f"floorguard_replay_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(services_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return _with_database(services_url, name)


async def test_a_mixed_workload_replays_identically_and_audits_clean(workers, ledger, settings, services):
    workers.start(**skewed_clock("+10m"))  # the original decisions, with a skewed clock
    await wait_until_serving(ledger)
    await mixed_workload(ledger, settings)
    await settle(settings)
    workers.stop_all()
    _, decided = await books(settings.database_url)
    assert all(count == 1 for count in decided.values())

    audited = await asyncio.to_thread(floorguard, settings, "audit")
    assert audited.returncode == 0, audited.stdout + audited.stderr
    assert "all invariants hold" in audited.stdout

    target = await empty_database(services.database_url)
    replayed = await asyncio.to_thread(floorguard, settings, "replay", "--into", target, "--verify")
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert "the rebuilt ledger is identical" in replayed.stdout
    again = await asyncio.to_thread(floorguard, settings, "replay", "--into", target)
    assert again.returncode == 2 and "empty" in again.stderr  # never replays over a ledger
    await verify_notices_a_changed_decision(settings, target)

    await tamper_and_audit(settings)


async def verify_notices_a_changed_decision(settings, target: str) -> None:
    from worker.replay import verify
    from worker.store import books as ledger_books

    connection = await asyncpg.connect(target)
    try:
        ends = await ledger_books.partition_positions(connection, settings.topics.commands)
        assert await verify(settings.database_url, target, settings.topics, ends) is None
        changed = await connection.fetchrow("UPDATE decisions SET amount = amount + 1 WHERE op = 'charge' AND status = 200 "
                                            "AND (wallet, seq) = (SELECT wallet, min(seq) FROM decisions WHERE op = 'charge' "
                                            "AND status = 200 GROUP BY wallet ORDER BY wallet LIMIT 1) RETURNING wallet, seq")  # fmt: skip
    finally:
        await connection.close()
    divergence = await verify(settings.database_url, target, settings.topics, ends)
    assert divergence is not None and f"('{changed['wallet']}', {changed['seq']})" in divergence and "amount" in divergence


async def tamper_and_audit(settings) -> None:
    connection = await asyncpg.connect(settings.database_url)
    try:
        victim = await connection.fetchval("SELECT wallet FROM wallets ORDER BY wallet LIMIT 1")
        await connection.execute("UPDATE wallets SET balance = balance + 1 WHERE wallet = $1", victim)
    finally:
        await connection.close()
    audited = await asyncio.to_thread(floorguard, settings, "audit")
    assert audited.returncode == 1 and f"balance: {victim}:" in audited.stdout, audited.stdout


async def test_audit_names_an_event_missing_from_a_copy_of_the_stream(workers, ledger, settings):
    workers.start()
    await wait_until_serving(ledger)
    for wallet in ("a", "b", "c"):
        await ledger.open(wallet)
        await ledger.credit(wallet, 10)
    stored = await events(settings, 6)
    dropped = next(e for e in stored if e["wallet"] == "b" and e["seq"] == 2)
    copy = f"{settings.topics.prefix}.events-copy"
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(copy, settings.partitions, 1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        for event in stored:
            if event != dropped:
                await producer.send_and_wait(copy, json.dumps(event).encode(), key=event["wallet"].encode())
    finally:
        await producer.stop()
    complete = await asyncio.to_thread(floorguard, settings, "audit")
    assert complete.returncode == 0, complete.stdout
    gapped = await asyncio.to_thread(floorguard, settings, "audit", "--events-topic", copy)
    assert gapped.returncode == 1 and "events: b: no event for seq 2" in gapped.stdout, gapped.stdout


@pytest.mark.parametrize("flag", ["--json", ""])
async def test_tail_follows_decisions_as_they_happen(workers, ledger, settings, flag):
    workers.start()
    await wait_until_serving(ledger)
    args = [sys.executable, "-m", "worker.cli", "tail", "--wallet", "t"] + ([flag] if flag else [])
    tail = subprocess.Popen(args, cwd=ROOT, env=worker_env(settings), stdout=subprocess.PIPE, text=True)
    try:
        await asyncio.sleep(4)  # the tail starts at the end: only what happens from now on
        await ledger.open("t")
        await ledger.open("other")
        await ledger.credit("t", 5)
        lines = [await asyncio.wait_for(asyncio.to_thread(tail.stdout.readline), 30) for _ in range(2)]
    finally:
        tail.terminate()
        tail.wait(timeout=30)
    if flag:
        assert [json.loads(line)["op"] for line in lines] == ["open", "credit"]
    else:
        assert "open" in lines[0] and "#1" in lines[0] and "credit" in lines[1] and "balance 5" in lines[1]


async def test_the_example_read_model_survives_redelivery(workers, ledger, settings, tmp_path):
    workers.start()
    await wait_until_serving(ledger)
    for wallet in ("x", "y"):
        await ledger.open(wallet)
        await ledger.credit(wallet, 100)
        await ledger.charge(wallet, 30)
        hold = await ledger.reserve(wallet, 20)
        await ledger.capture(wallet, hold.hold, 15)
    await events(settings, 10)
    database = tmp_path / "spend.sqlite3"
    command = [sys.executable, str(ROOT / "examples" / "spend_by_day.py"), "--bootstrap", settings.kafka_bootstrap,
               "--topic", settings.topics.events, "--db", str(database)]  # fmt: skip
    first = await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, timeout=120)
    second = await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, timeout=120)
    assert "applied 10 new events" in first.stdout, first.stdout + first.stderr
    assert "applied 0 new events" in second.stdout  # a second pass is a redelivery of everything
    import sqlite3

    rows = sqlite3.connect(database).execute("SELECT wallet, op, sum(amount) FROM spend GROUP BY wallet, op").fetchall()
    assert sorted(rows) == [("x", "capture", 15), ("x", "charge", 30), ("x", "credit", 100),
                            ("y", "capture", 15), ("y", "charge", 30), ("y", "credit", 100)]  # fmt: skip
