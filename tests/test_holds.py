"""Holds, the sweeper, broker time and prices through the real broker, database and workers."""

from __future__ import annotations

import asyncio
import random
import time
from datetime import datetime

import asyncpg
import pytest

from floorguard import HoldClosed, HoldExpired, InsufficientFunds, Ledger, Usage
from tests.conftest import skewed_clock, wait_until_serving
from tests.harness import books, events, send_all

SWEEPER_OFF = {"FLOORGUARD_SWEEP_INTERVAL_MS": "0"}


def ms(rfc3339: str) -> int:
    return int(datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp() * 1000)


async def wallet_row(database_url: str, wallet: str) -> dict:
    connection = await asyncpg.connect(database_url)
    try:
        return dict(await connection.fetchrow("SELECT * FROM wallets WHERE wallet = $1", wallet))
    finally:
        await connection.close()


async def expire_event(settings, wallet: str, hold: str, timeout_s: float = 30) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        found = [e for e in await events(settings, 1, timeout_s=timeout_s)
                 if e["wallet"] == wallet and e["op"] == "expire" and e["id"] == f"expire:{hold}"]  # fmt: skip
        if found:
            return found[0]
        assert time.monotonic() < deadline, "no expire decision"
        await asyncio.sleep(0.5)


async def test_an_expired_hold_refuses_capture_with_410_and_the_sweeper_gives_the_money_back(workers, ledger, settings):
    first = workers.start(**SWEEPER_OFF)  # nobody sweeps: the capture meets the hold past its expiry
    await wait_until_serving(ledger)
    await ledger.open("w")
    await ledger.credit("w", 100)
    reserved = await ledger.reserve("w", 60, ttl_ms=1_000, id="h")
    assert reserved.available == 40 and reserved.hold == "h"
    await asyncio.sleep(1.5)
    with pytest.raises(HoldExpired):
        await ledger.capture("w", "h", 10)
    with pytest.raises(HoldExpired):
        await ledger.extend("w", "h", 1)
    workers.stop_all()
    assert first.returncode is not None
    workers.start()  # a worker that sweeps leaves no hold behind
    expired = await expire_event(settings, "w", "h")
    assert expired["ok"] and expired["amount"] == 60 and expired["available"] == 100
    with pytest.raises(HoldClosed):
        await ledger.release("w", "h")
    row = await wallet_row(settings.database_url, "w")
    assert (row["balance"], row["reserved"]) == (100, 0)


async def test_under_normal_load_a_hold_is_released_within_two_seconds_of_its_expiry(workers, ledger, settings):
    workers.start()
    await wait_until_serving(ledger)
    await ledger.open("w")
    await ledger.credit("w", 1_000)
    holds = [await ledger.reserve("w", 10, ttl_ms=1_000 + 100 * i, id=f"h{i}") for i in range(5)]
    for hold in holds:
        expired = await expire_event(settings, "w", hold.hold)
        assert 0 <= ms(expired["at"]) - ms(hold.expires_at) <= 2_000, (hold.expires_at, expired["at"])
    assert (await wallet_row(settings.database_url, "w"))["reserved"] == 0


async def test_capture_after_a_worker_restart_and_the_hold_pattern(workers, ledger, settings):
    workers.start()
    await wait_until_serving(ledger)
    await ledger.open("w")
    await ledger.credit("w", 1_000)
    hold = await ledger.reserve("w", 300, id="before-restart")
    workers.stop_all()
    workers.start()
    captured = await ledger.capture("w", hold.hold, 120)
    assert captured.amount == 120 and captured.balance == 880 and captured.reserved == 0

    async with ledger.hold("w", estimate=200) as call:  # a call that returns: its cost is captured
        await call.extend(50)
        call.cost(230)
    assert call.closed.amount == 230 and call.closed.balance == 650
    with pytest.raises(RuntimeError):
        async with ledger.hold("w", estimate=100) as failed:  # a call that raises: released
            raise RuntimeError("the model call failed")
    assert failed.closed.op == "release" and failed.closed.available == 650


async def test_the_race_with_holds_mixed_in_never_crosses_the_budget(workers, ledger, settings):
    workers.start()
    await wait_until_serving(ledger)
    budget = 50_000
    await ledger.open("hot")
    await ledger.credit("hot", budget)
    charges = [{"v": 1, "op": "charge", "id": f"c{i}", "wallet": "hot", "amount": 7} for i in range(5_000)]
    rng = random.Random(11)

    async def agent(n: int) -> int:
        """Reserve, maybe extend, then capture or release; returns what it spent."""
        try:
            async with ledger.hold("hot", estimate=rng.randint(50, 400)) as call:
                if n % 3 == 0:
                    await call.extend(rng.randint(1, 100))
                if n % 4 == 0:
                    raise LookupError("the call failed")
                call.cost(rng.randint(0, 50))
            return call.closed.amount
        except (InsufficientFunds, LookupError):
            return 0

    async def agents() -> list[int]:
        results = []
        for wave in range(4):
            results += await asyncio.gather(*(agent(wave * 64 + i) for i in range(64)))
        return results

    spent_by_holds, _ = await asyncio.gather(agents(), send_all(settings, charges, producers=64))
    await asyncio.sleep(3)
    wallets, decided = await books(settings.database_url)
    hot = wallets["hot"]
    assert hot["reserved"] == 0 and hot["balance"] >= 0
    charged = [e for e in await events(settings, hot["seq"]) if e["op"] == "charge" and e["ok"]]
    assert hot["balance"] == budget - 7 * len(charged) - sum(spent_by_holds)
    assert all(count == 1 for count in decided.values())


async def test_a_worker_clock_ten_minutes_off_changes_no_decision(workers, ledger, settings):
    import os
    import subprocess
    import sys

    skew = skewed_clock("-10m")
    skewed = subprocess.run([sys.executable, "-c", "import time; print(time.time())"], env={**os.environ, **skew},
                            capture_output=True, text=True, check=True)  # fmt: skip
    assert 590 <= time.time() - float(skewed.stdout) <= 610, "libfaketime did not skew the clock"
    workers.start(**skew)
    await wait_until_serving(ledger)
    await ledger.open("w")
    opened_at = time.time() * 1000
    credited = await ledger.credit("w", 100)
    assert abs(ms(credited.at) - opened_at) < 5_000  # broker time, not the worker's clock
    hold = await ledger.reserve("w", 40, ttl_ms=1_000)
    expired = await expire_event(settings, "w", hold.hold)
    assert 0 <= ms(expired["at"]) - ms(hold.expires_at) <= 2_000


async def test_a_price_added_with_a_later_start_does_not_change_earlier_decisions(workers, ledger, settings):
    workers.start()
    await wait_until_serving(ledger)
    await ledger.open("w")
    await ledger.credit("w", 10_000_000)
    usage = Usage("model-x", input_tokens=1_000_000, output_tokens=1_000)
    from floorguard import UnknownModel

    with pytest.raises(UnknownModel):
        await ledger.charge_usage("w", usage)
    now_ms = int(time.time() * 1000)
    await add_price(settings, "model-x", now_ms + 5_500, input_price=300, output_price=1_500)
    await asyncio.sleep(6)
    first = await ledger.charge_usage("w", usage, id="priced-1")
    assert first.amount == 300 + 2  # ceil(1,500,000 / 1e6) = 2
    await add_price(settings, "model-x", int(time.time() * 1000) + 6_000, input_price=600, output_price=3_000)
    before = await ledger.charge_usage("w", usage, id="priced-2")
    await asyncio.sleep(7)
    after = await ledger.charge_usage("w", usage, id="priced-3")
    assert before.amount == 302 and after.amount == 603
    again = await ledger.charge_usage("w", usage, id="priced-1")
    assert again.duplicate and again.amount == 302


async def add_price(settings, model: str, valid_from_ms: int, *, input_price: int, output_price: int) -> None:
    from worker.core.model import Price
    from worker.store.store import Store

    store = await Store.connect(settings.database_url, pool_size_max=1)
    try:
        assert await store.add_price(Price(model, valid_from_ms, input_price, output_price), 5_000)
        assert not await store.add_price(Price(model, int(time.time() * 1000), 1, 1), 5_000)  # too soon
    finally:
        await store.close()
