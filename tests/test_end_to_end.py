"""The hard cap through the real broker, database and worker processes."""

from __future__ import annotations

import asyncio
import random
import signal
import uuid

from tests.conftest import wait_until_serving
from tests.harness import Replies, books, events, send_all

PRODUCERS = 64
CHARGES = 20_000
AMOUNT = 7


async def setup_wallets(ledger, names: list[str], balance: int) -> None:
    await asyncio.gather(*(ledger.open(n) for n in names))
    await asyncio.gather(*(ledger.credit(n, balance) for n in names))


def charges(wallets: list[str], count: int) -> list[dict]:
    return [{"v": 1, "op": "charge", "id": f"c-{i}-{uuid.uuid4().hex[:6]}", "wallet": wallets[i % len(wallets)],
             "amount": AMOUNT} for i in range(count)]  # fmt: skip


async def run_load(settings, commands: list[dict], tag: str = "") -> dict[str, list[dict]]:
    """Send the commands; return their replies by command id (correlation ids carry `tag`)."""
    replies = Replies(settings.kafka_bootstrap, settings.topics.replies, settings.partitions)
    await replies.start()
    try:
        await send_all(settings, commands, PRODUCERS, tag)
        await replies.wait_for({c["id"] + tag for c in commands})
    finally:
        await replies.stop()
    return {c["id"]: replies.received[c["id"] + tag] for c in commands}


async def test_the_race_on_one_wallet_accepts_exactly_what_was_funded(workers, ledger, settings):
    workers.start()
    await wait_until_serving(ledger)
    funded_for = 4_321
    await setup_wallets(ledger, ["hot"], funded_for * AMOUNT + AMOUNT - 1)
    commands = charges(["hot"], CHARGES)
    received = await run_load(settings, commands)

    statuses = [received[c["id"]][0]["status"] for c in commands]
    assert statuses.count(200) == funded_for and statuses.count(402) == CHARGES - funded_for
    wallets, decided = await books(settings.database_url)
    assert wallets["hot"]["balance"] == AMOUNT - 1
    assert all(decided[("hot", c["id"])] == 1 for c in commands)
    stored = await events(settings, CHARGES + 2)
    assert {(e["wallet"], e["seq"]) for e in stored} == {("hot", s) for s in range(1, CHARGES + 3)}


async def test_many_wallets_over_every_partition(workers, ledger, settings):
    workers.start()
    await wait_until_serving(ledger)
    names = [f"agent-{i}" for i in range(200)]
    await setup_wallets(ledger, names, 10 * AMOUNT)
    commands = charges(names, 4_000)  # 20 charges each against funds for 10
    received = await run_load(settings, commands)

    wallets, decided = await books(settings.database_url)
    assert len({w["partition"] for w in wallets.values()}) == settings.partitions
    for name in names:
        accepted = sum(received[c["id"]][0]["ok"] for c in commands if c["wallet"] == name)
        assert accepted == 10 and wallets[name]["balance"] == 0
    assert all(count == 1 for count in decided.values())


async def test_retries_are_duplicates_and_a_changed_body_is_a_conflict(workers, ledger, settings):
    workers.start()
    await wait_until_serving(ledger)
    await setup_wallets(ledger, ["w"], 1_000 * AMOUNT)
    first = charges(["w"], 1_000)
    await run_load(settings, first)
    retried = random.Random(7).sample(first, 300)  # the same commands, sent again
    received = await run_load(settings, retried, tag="-retry")
    for c in retried:
        (reply,) = received[c["id"]]
        assert reply["status"] == 200 and reply["duplicate"] is True and reply["amount"] == AMOUNT
    changed = [{**c, "amount": AMOUNT + 1} for c in retried[:50]]
    received = await run_load(settings, changed, tag="-changed")
    for c in changed:
        (reply,) = received[c["id"]]
        assert reply["error"] == "idempotency_conflict" and "seq" not in reply
    wallets, decided = await books(settings.database_url)
    assert wallets["w"]["balance"] == 0 and wallets["w"]["seq"] == 2 + 1_000
    assert all(count == 1 for count in decided.values())


async def test_retries_of_an_earlier_owners_decisions_are_duplicates_among_new_commands(workers, ledger, settings, tmp_path):
    """A worker looks up only the ids it decided lately, past the first records after its claim.
    Commands decided by the worker before it (stopped here), sent again among new ones, are
    presumed new by the next (whose window after the claim is none here), refused by the commit's
    unique key, and decided again with every id looked up: each answers its first decision."""
    first_worker = workers.start()
    await wait_until_serving(ledger)
    names = [f"w{i}" for i in range(8)]
    await setup_wallets(ledger, names, 400 * AMOUNT)
    first = charges(names, 2_000)
    before = await run_load(settings, first)
    first_worker.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(first_worker.wait, 60) == 0
    workers.start(FLOORGUARD_LOOK_UP_ALL_RECORDS="0")
    mixed = random.Random(3).sample(first, 400) + charges(names, 2_000)
    random.Random(4).shuffle(mixed)
    received = await run_load(settings, mixed, tag="-again")
    for c in mixed:
        (reply,) = received[c["id"]]
        if c["id"] in before:
            assert {**reply, "duplicate": False} == before[c["id"]][0] and reply["duplicate"] is True, reply
        else:
            assert reply["duplicate"] is False and reply["status"] in (200, 402), reply
    assert "deciding again, every id looked up" in (tmp_path / "worker-1.log").read_text()
    wallets, decided = await books(settings.database_url)
    decisions = {**received, **before}  # each id's first reply
    commands = {c["id"]: c for c in first + mixed}
    for name in names:  # funds for 400 charges each; 250 + 250 sent
        assert sum(decisions[i][0]["ok"] for i, c in commands.items() if c["wallet"] == name) == 400
        assert wallets[name]["balance"] == 0
    assert all(count == 1 for count in decided.values())
