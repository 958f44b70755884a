"""Crashes between commit and publish, fencing of a stale owner, and the database's own guard."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
import signal
import subprocess
import sys

import asyncpg
import pytest

from tests.conftest import ROOT, wait_until_serving, worker_env
from tests.harness import Replies, books, events, send_all
from worker.core.decide import decide_batch
from worker.core.model import Parsed, PartitionState, Record, Wallet
from worker.core.outgoing import rendered
from worker.core.parse import parse
from worker.decider import Decider
from worker.core.recent import Recent
from worker.store.store import Committed, Fenced, GuardRefused, PartitionBatch, Store, StoredAlready, Write


async def test_a_worker_killed_between_commit_and_publish_loses_and_repeats_nothing(workers, ledger, settings):
    # The wallet is made by a worker of its own, so that the failing one's first commit is a batch of
    # charges whatever the setup took (a probe sent again while the group formed is one more batch).
    setup = workers.start()
    await wait_until_serving(ledger)
    await ledger.open("w")
    await ledger.credit("w", 1_000)
    setup.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(setup.wait, 60) == 0
    first = workers.start(FLOORGUARD_FAILPOINT="after_commit:1")
    commands = [{"v": 1, "op": "charge", "id": f"k{i}", "wallet": "w", "amount": 3} for i in range(400)]
    replies = Replies(settings.kafka_bootstrap, settings.topics.replies, settings.partitions)
    await replies.start()
    try:
        await send_all(settings, commands, producers=8)
        assert await asyncio.to_thread(first.wait, 60) == -9  # SIGKILL after its first commit
        connection = await asyncpg.connect(settings.database_url)
        try:
            stranded = await connection.fetchval("SELECT count(*) FROM outbox")
        finally:
            await connection.close()
        assert stranded > 0, "the crash should have left committed records unpublished"
        workers.start()  # the next owner heals the outbox, then carries on
        await replies.wait_for({c["id"] for c in commands})
    finally:
        await replies.stop()
    wallets, decided = await books(settings.database_url)
    assert wallets["w"]["balance"] == 1_000 - 3 * 333 and wallets["w"]["seq"] == 2 + 400
    assert all(count == 1 for count in decided.values())
    seen = {(e["wallet"], e["seq"]) for e in await events(settings, 402)}
    assert seen == {("w", s) for s in range(1, 403)}


async def test_a_stale_owner_can_neither_apply_nor_advance(settings):
    store = await Store.connect(settings.database_url)
    topic = settings.topics.commands
    try:
        assert await store.claim(topic, 0) == 0

        def batch(offset: int, command_id: str) -> list:
            value = b'{"v":1,"op":"open","id":"%s","wallet":"w"}' % command_id.encode()
            return [parse(Record(0, offset, 1_000, b"w", value, ()), ())]

        def render(decision):
            return rendered(decision, settings.topics.events, settings.topics.dlq, topic)

        committed = await Decider(store).apply_one(topic, PartitionBatch(0, 0, batch(0, "o1")), render)  # the new owner
        assert committed.next_offset == 1
        with pytest.raises(Fenced):  # the old owner, still believing the partition is at 0
            await Decider(store).apply_one(topic, PartitionBatch(0, 0, batch(0, "o1")), render)
        again = await Decider(store).apply_one(topic, PartitionBatch(0, 1, batch(0, "o1")), render)  # redelivered: skipped
        assert again.decisions == [] and again.next_offset == 1
    finally:
        await store.close()
    wallets, decided = await books_after_outbox_cleared(settings.database_url)
    assert wallets["w"]["seq"] == 1 and decided[("w", "o1")] == 1


async def test_one_transaction_over_partitions_commits_the_owned_and_fences_the_stale(settings):
    store = await Store.connect(settings.database_url)
    topic = settings.topics.commands
    try:
        for partition in (0, 1):
            assert await store.claim(topic, partition) == 0

        def opening(partition: int, offset: int, wallet: str) -> Parsed:
            value = b'{"v":1,"op":"open","id":"o","wallet":"%s"}' % wallet.encode()
            return parse(Record(partition, offset, 1_000, wallet.encode(), value, ()), ())

        def render(decision):
            return rendered(decision, settings.topics.events, settings.topics.dlq, topic)

        decided = await Decider(store).decide(topic, [PartitionBatch(0, 0, [opening(0, 0, "a0"), opening(0, 1, "a1")]),
                                                      PartitionBatch(1, 0, [opening(1, 0, "b1")])])  # fmt: skip
        await Decider(store).apply_one(topic, PartitionBatch(1, 0, [opening(1, 0, "b0")]), render)  # partition 1 moved on
        outcome = await Decider(store).commit(topic, decided, render)
        assert isinstance(outcome[1], Fenced) and outcome[1].stored_offset == 1
        committed = outcome[0]
        assert committed.next_offset == 2 and [d.reply["wallet"] for d in committed.decisions] == ["a0", "a1"]
        assert len(committed.outbox.records) == 2  # the two events of partition 0, nothing of the fenced one
        assert len(await store.pending_outbox(topic, 1)) == 1  # its own earlier batch's row, none of the fenced batch
        assert await store.claim(topic, 0) == 2 and await store.claim(topic, 1) == 1
    finally:
        await store.close()
    wallets, decided = await books_after_outbox_cleared(settings.database_url)
    assert sorted(wallets) == ["a0", "a1", "b0"] and all(count == 1 for count in decided.values())


async def test_an_expire_is_looked_up_even_when_ids_are_presumed_new(settings):
    """409 hold_not_expired is not stored, so the commit cannot catch an expire presumed new that
    has an earlier decision: expires are always looked up. Here expire:h was refused 404 before
    the hold h existed; sent again while h is open, it is that decision's duplicate."""
    async with _owner_of_partition_0(settings) as (store, topic):
        record, render = _on_wallet_w, _renderer(settings, topic)
        expire = b'{"v":1,"op":"expire","id":"expire:h","wallet":"w","hold":"h"}'
        setup = _funded_w(expire, b'{"v":1,"op":"reserve","id":"h","wallet":"w","amount":5}')
        committed = await Decider(store).apply_one(topic, PartitionBatch(0, 0, setup), render)
        assert committed.decisions[2].reply["error"] == "hold_not_found"
        again = await Decider(store).apply_one(
            topic, PartitionBatch(0, 4, [record(4, expire)], recent=Recent(), look_up_all=False), render)
        (duplicate,) = again.decisions
        assert duplicate.reply == {**committed.decisions[2].reply, "duplicate": True}, duplicate.reply


def _on_wallet_w(offset: int, value: bytes) -> Parsed:
    """A command record of wallet w on partition 0, at `offset`, its broker time 1,000 + offset."""
    return parse(Record(0, offset, 1_000 + offset, b"w", value, ()), ())


def _funded_w(*then: bytes) -> list[Parsed]:
    """Wallet w opened and credited 10 at offsets 0 and 1, then the commands `then` from offset 2."""
    values = [b'{"v":1,"op":"open","id":"o","wallet":"w"}', b'{"v":1,"op":"credit","id":"f","wallet":"w","amount":10}',
              *then]  # fmt: skip
    return [_on_wallet_w(offset, value) for offset, value in enumerate(values)]


def _renderer(settings, topic: str):
    return lambda decision: rendered(decision, settings.topics.events, settings.topics.dlq, topic)


@asynccontextmanager
async def _owner_of_partition_0(settings):
    """A store that has just claimed partition 0 of the commands topic, never decided before."""
    store = await Store.connect(settings.database_url)
    try:
        assert await store.claim(settings.topics.commands, 0) == 0
        yield store, settings.topics.commands
    finally:
        await store.close()


async def test_a_batch_decided_while_the_last_one_commits_sees_it_and_is_fenced_if_it_fails(settings):
    """The worker decides a partition's next batch from the state its last batch left, before that
    batch is committed: a retry of a command still committing is a duplicate, the balance is the one
    after it; and if that commit never happens, the next batch is fenced rather than stored."""
    async with _owner_of_partition_0(settings) as (store, topic):
        record, render = _on_wallet_w, _renderer(settings, topic)
        setup = _funded_w()
        committed = await Decider(store).apply_one(topic, PartitionBatch(0, 0, setup), render)
        charge = b'{"v":1,"op":"charge","id":"c1","wallet":"w","amount":7}'
        decider = Decider(store)
        first = await decider.decide(topic, [PartitionBatch(0, 2, [record(2, charge)], committed.state)])
        second = await decider.decide(topic, [PartitionBatch(0, 3, [record(3, charge), record(4, charge.replace(
            b'"c1"', b'"c2"'))], first.states[0], committing=True)])  # fmt: skip
        retry, refused = second.writes[0].decisions
        assert retry.reply["duplicate"] and retry.reply["balance"] == 3, retry.reply
        assert refused.reply["status"] == 402 and refused.reply["available"] == 3, refused.reply
        # The first batch's commit never happens (its worker died): the second one is fenced.
        assert isinstance((await decider.commit(topic, second, render))[0], Fenced)
        assert isinstance((await decider.commit(topic, first, render))[0], Committed)
        assert isinstance((await decider.commit(topic, second, render))[0], Committed)  # in order, it is stored
    wallets, decided = await books_after_outbox_cleared(settings.database_url)
    assert wallets["w"]["balance"] == 3 and wallets["w"]["seq"] == 4 and all(n == 1 for n in decided.values())


async def test_an_id_presumed_new_that_was_decided_before_refuses_the_whole_commit(settings):
    """A worker looks up only the ids it decided lately; the others it presumes new, and the
    decisions' unique key checks that in the commit: a wrong presumption writes nothing at all,
    and the batch decided again with every id looked up answers the earlier decision."""
    async with _owner_of_partition_0(settings) as (store, topic):
        record, render = _on_wallet_w, _renderer(settings, topic)
        charge = b'{"v":1,"op":"charge","id":"c1","wallet":"w","amount":7}'
        setup = _funded_w(charge)
        await Decider(store).apply_one(topic, PartitionBatch(0, 0, setup), render)  # by an earlier owner
        batch = [record(3, charge.replace(b'"c1"', b'"c2"').replace(b"7", b"1")), record(4, charge)]
        fresh = Recent()  # a new owner's: it decided nothing on the partition yet
        presumed = await Decider(store).decide(topic, [PartitionBatch(0, 3, batch, recent=fresh, look_up_all=False)])
        # c1 presumed new: refused 402 (a stored decision, so it must be checked like any other)
        assert presumed.presumed and [d.reply["status"] for d in presumed.writes[0].decisions] == [200, 402]
        assert ("w", "c2") in fresh and ("w", "c1") in fresh  # what it decided, doubted from now on
        with pytest.raises(StoredAlready, match="1 of 2 decisions"):
            await Decider(store).commit(topic, presumed, render)
        assert await store.claim(topic, 0) == 3  # nothing moved
        again = await Decider(store).apply_one(topic, PartitionBatch(0, 3, batch, recent=fresh), render)
        first, retry = again.decisions
        assert first.reply["balance"] == 2 and retry.reply["duplicate"] and retry.reply["balance"] == 3, retry.reply
    wallets, decided = await books_after_outbox_cleared(settings.database_url)
    assert wallets["w"]["balance"] == 2 and wallets["w"]["seq"] == 4 and all(n == 1 for n in decided.values())


async def books_after_outbox_cleared(database_url: str):
    connection = await asyncpg.connect(database_url)
    try:
        await connection.execute("DELETE FROM outbox")  # nothing publishes in this test
    finally:
        await connection.close()
    return await books(database_url)


async def test_the_database_refuses_an_overdraft_even_from_a_buggy_writer(settings):
    connection = await asyncpg.connect(settings.database_url)
    store = await Store.connect(settings.database_url)
    try:
        await connection.execute("INSERT INTO wallets VALUES ('w', 10, 0, 0, 1, 0)")
        await connection.execute("INSERT INTO partitions VALUES ('buggy', 0, 0, 0)")
        version = await connection.fetchval("SELECT version FROM auth_settings")

        def move(balance: int, seen: int) -> Write:  # what a buggy core might hand the store
            return Write(0, seen, seen + 1, 0, {"w": Wallet("w", 10 if seen == 0 else 0, 0, 0, 1 + seen, 0)},
                         {"w": Wallet("w", balance, 0, 0, 2 + seen, 0)}, [])  # fmt: skip

        # The guarded statement moves nothing when the move would cross the floor, and the whole
        # transaction is refused: the partition's position did not move either ...
        with pytest.raises(GuardRefused, match="changed 0 of 1 wallets"):
            await store.commit("buggy", [move(-1, 0)], {0: []}, {0: []}, [], version)
        assert await connection.fetchval("SELECT balance FROM wallets WHERE wallet = 'w'") == 10
        assert await connection.fetchval("SELECT next_offset FROM partitions WHERE topic = 'buggy'") == 0
        stored = await store.commit("buggy", [move(0, 0)], {0: []}, {0: []}, [], version)
        assert not stored.fenced and stored.auth_version is None
        assert await connection.fetchval("SELECT balance FROM wallets WHERE wallet = 'w'") == 0
        # ... a move from a seq the wallet is no longer at is refused the same way ...
        with pytest.raises(GuardRefused):
            await store.commit("buggy", [Write(0, 1, 2, 0, {"w": Wallet("w", 10, 0, 0, 1, 0)},
                                               {"w": Wallet("w", 5, 0, 0, 2, 0)}, [])], {0: []}, {0: []}, [], version)  # fmt: skip
        # ... and the CHECK constraint stops any other statement.
        with pytest.raises(asyncpg.CheckViolationError):
            await connection.execute("UPDATE wallets SET balance = -1 WHERE wallet = 'w'")
    finally:
        await store.close()
        await connection.close()


async def test_the_database_refuses_a_decision_on_a_wallet_the_batch_does_not_move(settings):
    """The commit checks what the decisions' foreign key checked: a buggy writer's decision on a
    wallet that does not exist (its batch neither opens nor moves it) is refused with the batch."""
    connection = await asyncpg.connect(settings.database_url)
    store = await Store.connect(settings.database_url)
    try:
        await connection.execute("INSERT INTO partitions VALUES ('buggy', 0, 0, 0)")
        version = await connection.fetchval("SELECT version FROM auth_settings")
        charge = parse(Record(0, 0, 1_000, b"ghost", b'{"v":1,"op":"charge","id":"c","wallet":"ghost","amount":1}', ()), ())
        state = PartitionState(0, 1_000, {"ghost": Wallet("ghost", 10, 0, 0, 1, 0)})  # a core that believed in it
        (decision,) = decide_batch(state, [charge])
        encoded, _ = rendered(decision, settings.topics.events, settings.topics.dlq, "buggy")
        with pytest.raises(GuardRefused, match="neither opens nor moves"):
            await store.commit("buggy", [Write(0, 0, 1, 1_000, {}, {}, [decision])], {0: []}, {0: [(decision, encoded)]},
                               [], version)  # fmt: skip
        assert await connection.fetchval("SELECT count(*) FROM decisions") == 0
        assert await connection.fetchval("SELECT next_offset FROM partitions WHERE topic = 'buggy'") == 0
    finally:
        await store.close()
        await connection.close()


async def test_the_worker_refuses_a_commands_topic_without_log_append_time(settings):
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        await admin.delete_topics([settings.topics.commands])
        await asyncio.sleep(2)
        await admin.create_topics([NewTopic(settings.topics.commands, 1, 1, topic_configs={"retention.ms": "-1"})])
    finally:
        await admin.close()
    result = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "worker.cli", "worker"], cwd=ROOT, env=worker_env(settings),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode != 0 and "message.timestamp.type" in result.stderr, result.stderr[-2000:]
