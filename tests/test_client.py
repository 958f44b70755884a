"""The agent's client against the real services: retries under the same id, typed refusals."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from floorguard import IdempotencyConflict, Ledger, WalletNotFound
from tests.conftest import wait_until_serving


async def test_a_retry_after_a_timeout_reuses_the_command_id(workers, ledger, settings):
    workers.start()
    await wait_until_serving(ledger)
    await ledger.open("r")
    await ledger.credit("r", 100)
    workers.stop_all()  # nobody decides: the first attempts time out
    async with Ledger(settings.kafka_bootstrap, topic_prefix=settings.topics.prefix, timeout_s=2, attempts=30) as slow:
        charging = asyncio.create_task(slow.charge("r", 30, id="retried-charge"))
        await asyncio.sleep(5)  # two or three attempts sent, all under the same id
        workers.start()
        reply = await charging
    assert reply.ok and reply.amount == 30
    connection = await asyncpg.connect(settings.database_url)
    try:
        balance = await connection.fetchval("SELECT balance FROM wallets WHERE wallet = 'r'")
        decisions = await connection.fetchval("SELECT count(*) FROM decisions WHERE id = 'retried-charge'")
    finally:
        await connection.close()
    assert balance == 70 and decisions == 1


async def test_refusals_raise_typed_errors(workers, ledger):
    workers.start()
    await wait_until_serving(ledger)
    with pytest.raises(WalletNotFound):
        await ledger.charge("nobody", 1)
    await ledger.open("t")
    await ledger.credit("t", 5, id="credit-once")
    with pytest.raises(IdempotencyConflict) as conflict:
        await ledger.credit("t", 6, id="credit-once")
    assert conflict.value.status == 409 and conflict.value.reply.seq is None
