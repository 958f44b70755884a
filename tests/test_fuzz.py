"""Broken input (issue 6): every malformed record gets a 422 naming its fault or a dead letter with
the reason; the worker never stops, keeps answering everyone else, and the ledger is untouched.

The grammar of broken records is `tests/fuzzing.py`. Hypothesis drives it against the parser in
process (shrinking any failure); a seeded random walk of the same grammar makes the 100,000
records sent through the real `floorguard worker` process. The seed is printed and named in
every failure: `FLOORGUARD_FUZZ_SEED=<seed>` replays the same records,
`FLOORGUARD_FUZZ_RECORDS=<n>` changes how many.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import TEST_PARTITIONS, wait_until_serving
from tests.fuzzing import (
    Case,
    HypothesisChooser,
    Outcome,
    RandomChooser,
    World,
    broken_record,
    fuzz_record,
    garbage_record,
    names_a_known_field,
    names_field,
)
from tests.test_vectors import REPLY_VALIDATOR
from worker.core.decide import decide
from worker.core.model import Command, Invalid, PartitionState, Record
from worker.core.parse import parse

FUZZ_RECORDS = int(os.environ.get("FLOORGUARD_FUZZ_RECORDS", "100000"))
ANSWERS_TIMEOUT_S = 240  # for all the fuzz's answers; at a few thousand records/s they take ~40 s
FUZZ_UNANSWERED_MAX = 2_500  # about a second of the worker's work queued at any time
GOOD_CHARGES_PER_S = 20  # the well-behaved agent's modest rate during the fuzz
GOOD_REPLY_TIMEOUT_S = 30  # generous: speed belongs in benchmarks, this checks it is never stuck
MESSAGE_LENGTH_MAX_CHARS = 1024  # D3
SCHEMA_CHECKED_REPLIES_MAX = 2_000  # jsonschema is slow; a sample of the replies is validated

FORBIDDEN = ("fz.commands", "fz.events", "fz.dlq")
WORLD = World(
    wallets=tuple(f"fz-{i}" for i in range(8)),
    holds={f"fz-{i}": f"fz-hold-{i}" for i in range(8)},
    reply_topic="fz.fuzz-replies",
    reply_partitions=TEST_PARTITIONS,
    ledger_topics=FORBIDDEN,
    missing_topics=("fz.nowhere", "nowhere-0", "nowhere-1"),
)


def record_of(case: Case, offset: int = 0, correlation_id: str | None = None) -> Record:
    """The record as a worker reads it (a null header value reads as empty)."""
    headers = [(name, value or b"") for name, value in case.headers]
    if correlation_id is not None:
        headers.append(("correlation_id", correlation_id.encode()))
    return Record(0, offset, 0, case.key, case.value, tuple(headers))


def check_parsed(case: Case, command: Command | Invalid, dead_letter_reason: str | None, reply_to: str | None) -> None:
    """What parse made of a case is what the case expects."""
    expect = case.expect
    assert isinstance(command, Invalid), f"a broken record was taken as a command: {command}"
    assert len(command.message) <= MESSAGE_LENGTH_MAX_CHARS, command.message[:100]
    if expect.outcome is Outcome.DEAD_LETTER:
        assert dead_letter_reason is not None and f"{expect.field}: " in dead_letter_reason, dead_letter_reason
        return
    assert dead_letter_reason is None, dead_letter_reason
    assert reply_to is not None
    if expect.field is None:
        assert names_a_known_field(command.message), command.message
    else:
        assert names_field(command.message, expect.field), (expect.field, command.message)


# --- the parser, in process -----------------------------------------------------------------------


@settings(max_examples=1_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_parse_names_the_fault_of_every_broken_record(data):
    case = broken_record(HypothesisChooser(data), WORLD) if data.draw(st.integers(0, 9)) else \
        garbage_record(HypothesisChooser(data), WORLD)  # fmt: skip
    parsed = parse(record_of(case, correlation_id="c-1" if case.correlated else None), FORBIDDEN)
    address = parsed.reply_address
    check_parsed(case, parsed.command, parsed.dead_letter_reason, address.topic if address else None)
    REPLY_VALIDATOR.validate(decide(PartitionState(0, 0), parsed, 0).reply)  # the 422 fits the published schema


def test_an_expire_whose_id_fails_its_own_check_echoes_no_id():
    """Regression (found by the fuzzer): D2 echoes only an id that passes its own check, and an
    expire's is expire:<hold>; the id `h-1` was echoed beside op expire, against the reply schema."""
    value = json.dumps({"v": 1, "op": "expire", "id": "h-1", "wallet": "w", "hold": "h-1"}).encode()
    parsed = parse(Record(0, 0, 0, b"w", value, (("reply_to", b"fz.replies"),)), FORBIDDEN)
    reply = decide(PartitionState(0, 0), parsed, 0).reply
    assert reply["id"] is None and reply["op"] == "expire" and reply["message"].startswith("id: "), reply
    REPLY_VALIDATOR.validate(reply)


def test_the_seeded_grammar_agrees_with_parse():
    """The fast half of the grammar, the one the worker is sent, checked in process first."""
    chooser = RandomChooser(seed := random.randrange(2**32))
    for n in range(20_000):
        case = fuzz_record(chooser, WORLD)
        parsed = parse(record_of(case, correlation_id=f"c-{n}" if case.correlated else None), FORBIDDEN)
        address = parsed.reply_address
        try:
            check_parsed(case, parsed.command, parsed.dead_letter_reason, address.topic if address else None)
        except AssertionError as error:
            raise AssertionError(f"seed {seed}, record {n}: {case}: {error}") from error


headers_strategy = st.lists(
    st.tuples(st.sampled_from(["reply_to", "correlation_id", "reply_partition", "auth", "x"]),
              st.one_of(st.binary(max_size=12), st.sampled_from([b"fz.replies", b"fz.dlq", b"0", b"7", b"c-1"]))),
    max_size=5,
)  # fmt: skip
json_objects = st.dictionaries(
    st.sampled_from(["v", "op", "id", "wallet", "amount", "usage", "floor", "hold", "ttl_ms", "memo", "x"]),
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8), st.sampled_from(
        ["open", "charge", "expire", "w", "expire:h", 1, {"model": "m", "input_tokens": 1, "output_tokens": 2}])),
).map(lambda document: json.dumps(document).encode())  # fmt: skip


@settings(max_examples=2_000, deadline=None)
@given(st.one_of(st.none(), st.binary(max_size=16), st.just(b"w")),
       st.one_of(st.none(), st.binary(max_size=64), json_objects), headers_strategy)  # fmt: skip
def test_parse_never_raises_and_refuses_in_terms_of_the_contract(key, value, headers):
    parsed = parse(Record(0, 0, 0, key, value, tuple(headers)), FORBIDDEN)
    if isinstance(parsed.command, Command):
        # What is decided can be stored: PostgreSQL's text takes UTF-8 without NUL.
        for text in (parsed.command.id, parsed.command.wallet, parsed.command.memo or ""):
            assert "\x00" not in text and text.encode()
        assert parsed.dead_letter_reason is None
        return
    assert names_a_known_field(parsed.command.message), parsed.command.message
    assert len(parsed.command.message) <= MESSAGE_LENGTH_MAX_CHARS
    # The dead-letter rule: a 422 without a usable reply address goes to the dlq, and only then.
    assert (parsed.dead_letter_reason is not None) == (parsed.reply_address is None)


# --- the real worker ------------------------------------------------------------------------------


@dataclass
class Topic:
    """Every record of some topics from now on, read in the background."""

    bootstrap: str
    names: list[str]
    partitions: int
    records: list = field(default_factory=list)

    async def __aenter__(self) -> Topic:
        self._consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False,
                                          max_partition_fetch_bytes=4 * 1024 * 1024)  # fmt: skip
        await self._consumer.start()
        parts = [TopicPartition(name, p) for name in self.names for p in range(self.partitions)]
        self._consumer.assign(parts)
        await self._consumer.seek_to_beginning(*parts)
        self._task = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        while True:
            for batch in (await self._consumer.getmany(timeout_ms=100, max_records=10_000)).values():
                self.records.extend(batch)

    async def __aexit__(self, *exc) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self._consumer.stop()


@dataclass
class GoodAgent:
    """Valid charges on wallets of its own at a modest rate, each reply's latency measured."""

    ledger: object
    wallets: list[str]
    latencies_s: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    async def run(self, stop: asyncio.Event) -> None:
        in_flight = set()
        n = 0
        while not stop.is_set():
            in_flight.add(asyncio.create_task(self._charge(self.wallets[n % len(self.wallets)])))
            in_flight = {task for task in in_flight if not task.done()}
            n += 1
            await asyncio.sleep(1 / GOOD_CHARGES_PER_S)
        await asyncio.gather(*in_flight)

    async def _charge(self, wallet: str) -> None:
        began_s = time.monotonic()
        try:
            reply = await asyncio.wait_for(self.ledger.charge(wallet, 1), GOOD_REPLY_TIMEOUT_S)
        except Exception as error:  # noqa: BLE001 - reported by the test
            self.failures.append(f"{wallet}: {error!r}")
            return
        self.latencies_s.append(time.monotonic() - began_s)
        if reply.status != 200:
            self.failures.append(f"{wallet}: {reply}")


async def ledger_snapshot(database_url: str) -> dict:
    connection = await asyncpg.connect(database_url)
    try:
        return {
            "wallets": {r["wallet"]: dict(r) for r in await connection.fetch("SELECT * FROM wallets")},
            "holds": sorted(map(tuple, await connection.fetch("SELECT * FROM holds"))),
            "decisions": dict(
                map(tuple, await connection.fetch("SELECT wallet, count(*) FROM decisions GROUP BY wallet"))
            ),
        }
    finally:
        await connection.close()


async def create_topic(bootstrap: str, name: str, partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        await admin.close()


async def delete_topic(bootstrap: str, name: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_topics([name])
    finally:
        await admin.close()


def sent_headers(case: Case, run: str, n: int) -> list[tuple[str, bytes | None]]:
    headers = list(case.headers)
    if case.correlated:
        headers.append(("correlation_id", f"{run}-{n}".encode()))
    headers.append(("fuzz", str(n).encode()))
    return headers


async def produce(bootstrap: str, topic: str, cases: list[Case], run: str, answered: Callable[[], int]) -> list:
    """Send every case: a unique correlation_id where it is meant to have one, and a `fuzz` header
    (which the contract ignores) that finds its dead letter again. Returns the record metadata.

    At most FUZZ_UNANSWERED_MAX records are out unanswered: a blast of 100,000 at once would only
    measure the queue in front of the well-behaved agent, not whether broken input slows it."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5,
                                max_request_size=4 * 1024 * 1024, max_batch_size=256 * 1024)  # fmt: skip
    await producer.start()
    try:
        futures = []
        for n, case in enumerate(cases):
            while n - answered() > FUZZ_UNANSWERED_MAX:
                await asyncio.sleep(0.01)
            headers = sent_headers(case, run, n)
            futures.append(await producer.send(topic, case.value, key=case.key, headers=headers))
        return await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def test_a_hundred_thousand_broken_records_through_the_real_worker(workers, ledger, settings):
    seed = int(os.environ.get("FLOORGUARD_FUZZ_SEED", random.randrange(2**32)))
    prefix = settings.topics.prefix
    world = World(
        wallets=tuple(f"fz-{i}" for i in range(8)),
        holds={f"fz-{i}": f"fz-hold-{i}" for i in range(8)},
        reply_topic=f"{prefix}.fuzz-replies",
        reply_partitions=TEST_PARTITIONS,
        ledger_topics=(settings.topics.commands, settings.topics.events, settings.topics.dlq),
        missing_topics=tuple(f"{prefix}.nowhere-{i}" for i in range(3)) + (f"nowhere-{uuid.uuid4().hex}",),
    )
    worker = workers.start()
    began_s = time.monotonic()
    chooser = RandomChooser(seed)
    cases = [fuzz_record(chooser, world) for _ in range(FUZZ_RECORDS)]
    generation_s = time.monotonic() - began_s
    print(f"\nfuzz seed {seed} (FLOORGUARD_FUZZ_SEED={seed} replays it): {len(cases)} records in {generation_s:.1f} s")

    await wait_until_serving(ledger)
    good_wallets = [f"good-{i}" for i in range(4)]
    await asyncio.gather(*(ledger.open(w) for w in (*world.wallets, *good_wallets)))
    await asyncio.gather(*(ledger.credit(w, 10**12) for w in (*world.wallets, *good_wallets)))
    await asyncio.gather(*(ledger.reserve(w, 10**6, ttl_ms=86_400_000, id=world.holds[w]) for w in world.wallets))
    before = await ledger_snapshot(settings.database_url)
    await create_topic(settings.kafka_bootstrap, world.reply_topic, TEST_PARTITIONS)

    agent = GoodAgent(ledger, good_wallets)
    stop = asyncio.Event()
    try:
        async with Topic(settings.kafka_bootstrap, [world.reply_topic], TEST_PARTITIONS) as replies, \
                Topic(settings.kafka_bootstrap, [settings.topics.dlq], TEST_PARTITIONS) as dlq:  # fmt: skip
            good = asyncio.create_task(agent.run(stop))
            began_s = time.monotonic()
            sent = await produce(settings.kafka_bootstrap, settings.topics.commands, cases, f"fz{seed}",
                                 lambda: len(replies.records) + len(dlq.records))  # fmt: skip
            produce_s = time.monotonic() - began_s
            await wait_for_answers(cases, replies, dlq, began_s)
            answered_s = time.monotonic() - began_s
            stop.set()
            await good
            await asyncio.sleep(1)  # a repeat, if any were sent, would arrive now
            counts = check_answers(cases, sent, replies.records, dlq.records, run=f"fz{seed}", seed=seed)
    finally:
        stop.set()
        try:
            await delete_topic(settings.kafka_bootstrap, world.reply_topic)
        except KafkaError as error:  # never hide the test's own failure behind its cleanup's
            print(f"{world.reply_topic} not deleted: {error!r}")

    latencies = sorted(agent.latencies_s)
    print(f"sent in {produce_s:.1f} s; every answer in {answered_s:.1f} s ({len(cases) / answered_s:,.0f} records/s); "
          f"{dict(counts)}")  # fmt: skip
    print(f"well-behaved charges during the fuzz: {len(latencies)}, p50 {statistics.median(latencies) * 1000:.0f} ms, "
          f"p99 {latencies[int(len(latencies) * 0.99) - 1] * 1000:.0f} ms, max {latencies[-1] * 1000:.0f} ms")  # fmt: skip
    assert not agent.failures, agent.failures[:5]
    assert len(latencies) >= GOOD_CHARGES_PER_S, "the well-behaved agent barely ran"

    # The ledger is untouched: the fuzz wallets, holds and decisions are as they were.
    after = await ledger_snapshot(settings.database_url)
    fuzz_wallets = set(world.wallets)
    assert {w: r for w, r in after["wallets"].items() if w in fuzz_wallets} == \
        {w: r for w, r in before["wallets"].items() if w in fuzz_wallets}, f"seed {seed}"  # fmt: skip
    assert after["holds"] == before["holds"], f"seed {seed}"
    assert set(after["wallets"]) == set(before["wallets"]), f"seed {seed}: a wallet appeared"
    for wallet in fuzz_wallets:
        assert after["decisions"][wallet] == before["decisions"][wallet], f"seed {seed}: {wallet}"
    assert sum(after["decisions"][w] for w in good_wallets) == \
        sum(before["decisions"][w] for w in good_wallets) + len(latencies)  # fmt: skip
    await check_no_fuzz_events(settings, after, sent)

    assert worker.poll() is None, "the worker stopped"
    log = (workers.log_dir / "worker-0.log").read_text(errors="replace")
    assert "Traceback" not in log and "CRITICAL" not in log, log[-3000:]


async def wait_for_answers(cases: list[Case], replies: Topic, dlq: Topic, began_s: float) -> None:
    expected = len(cases)
    deadline_s = time.monotonic() + ANSWERS_TIMEOUT_S
    while len(replies.records) + len(dlq.records) < expected:
        answered = len(replies.records) + len(dlq.records)
        assert time.monotonic() < deadline_s, f"{expected - answered} of {expected} records have no answer"
        await asyncio.sleep(0.5)


def check_answers(cases: list[Case], sent: list, replies: list, dead_letters: list, run: str, seed: int) -> Counter:
    """Each case has exactly its answer, where it should be; nothing else came."""
    by_correlation: dict[str, list] = {}
    for record in replies:
        by_correlation.setdefault(dict(record.headers)["correlation_id"].decode(), []).append(record)
    by_fuzz: dict[int, list] = {}
    reply_dead_letters: dict[str, list] = {}
    for record in dead_letters:
        headers = dict(record.headers)
        if "fuzz" in headers and "source_offset" in headers:
            by_fuzz.setdefault(int(headers["fuzz"]), []).append(record)
        else:  # a reply whose topic does not exist: the reply itself, its correlation_id kept
            reply_dead_letters.setdefault(headers["correlation_id"].decode(), []).append(record)
    counts: Counter = Counter()
    schema_checked = 0
    for n, (case, metadata) in enumerate(zip(cases, sent, strict=True)):
        correlation_id = f"{run}-{n}"
        where = f"seed {seed}, record {n} ({case.mutation}, expected {case.expect}): {case}"
        expect = case.expect
        counts[expect.outcome.name] += 1
        if expect.outcome is Outcome.DEAD_LETTER:
            found = by_fuzz.pop(n, [])
            assert len(found) == 1, f"{len(found)} dead letters: {where}"
            check_dead_letter(case, sent_headers(case, run, n), metadata, found[0], where)
            continue
        found = (by_correlation if expect.outcome is Outcome.REPLY else reply_dead_letters).pop(correlation_id, [])
        assert len(found) == 1, f"{len(found)} answers: {where}"
        reply = json.loads(found[0].value)
        if expect.outcome is Outcome.REPLY_DEAD_LETTER:
            reason = dict(found[0].headers)["reason"].decode()
            assert "does not exist" in reason, f"{reason}: {where}"
        assert reply["status"] == 422 and reply["error"] == "invalid_command" and reply["ok"] is False, where
        assert "seq" not in reply and "balance" not in reply and "amount" not in reply, f"{reply}: {where}"
        if expect.field is None:
            assert names_a_known_field(reply["message"]), f"{reply['message']}: {where}"
        else:
            assert names_field(reply["message"], expect.field), f"{reply['message']}: {where}"
        if schema_checked < SCHEMA_CHECKED_REPLIES_MAX:
            REPLY_VALIDATOR.validate(reply)
            schema_checked += 1
    left = {"replies": by_correlation, "dead letters": by_fuzz, "undeliverable replies": reply_dead_letters}
    for what, records in left.items():
        assert not records, f"seed {seed}: {len(records)} {what} answer no record sent, e.g. {next(iter(records.items()))}"
    return counts


def check_dead_letter(case: Case, sent: list, metadata, record, where: str) -> None:
    """The record as it came: its key, value and headers, plus why and where from (D10)."""
    assert record.key == case.key and record.value == (case.value or b""), where
    headers = record.headers
    sent = [(name, value or b"") for name, value in sent]  # a null header value is kept as empty
    assert [(n, v or b"") for n, v in headers[: len(sent)]] == sent, f"{headers}: {where}"
    extra = dict(headers[len(sent):])
    assert f"{case.expect.field}: ".encode() in extra["reason"], f"{extra['reason']!r}: {where}"
    assert extra["source_partition"] == str(metadata.partition).encode(), where
    assert extra["source_offset"] == str(metadata.offset).encode(), where


async def check_no_fuzz_events(settings, books: dict, sent: list) -> None:
    """Every event is of a stored decision, and none came from a fuzz record's offset."""
    stored = sum(books["decisions"].values())
    async with Topic(settings.kafka_bootstrap, [settings.topics.events], settings.partitions) as events:
        deadline_s = time.monotonic() + 30
        while len(events.records) < stored:
            assert time.monotonic() < deadline_s, f"{stored - len(events.records)} events missing"
            await asyncio.sleep(0.2)
        await asyncio.sleep(0.5)
    assert len({(json.loads(r.value)["wallet"], json.loads(r.value)["seq"]) for r in events.records}) == stored
    fuzz_positions = {(m.partition, m.offset) for m in sent}
    assert not [r for r in events.records if (json.loads(r.value)["partition"], json.loads(r.value)["offset"])
                in fuzz_positions]  # fmt: skip


async def test_a_memo_the_database_cannot_store_is_a_422_and_the_worker_goes_on(workers, ledger, settings):
    """Regression: a memo holding NUL or a lone surrogate (legal JSON escapes) used to pass the
    parser, then fail the decision's INSERT with an error that is not retried: the worker stopped,
    and every restart met the same record again, so its partition never moved (a poison pill)."""
    worker = workers.start()
    await wait_until_serving(ledger)
    await ledger.open("w")
    await ledger.credit("w", 100)
    for memo in ("nul \x00 here", "\ud800", "a\udfffb"):
        reply = await ledger.send({"v": 1, "op": "charge", "id": uuid.uuid4().hex, "wallet": "w", "amount": 1,
                                   "memo": memo}, raise_on_refusal=False)  # fmt: skip
        assert reply.status == 422 and reply.message.startswith("memo: "), reply
    assert (await ledger.charge("w", 1, memo="fine: é, 😀, \u2028")).status == 200
    assert worker.poll() is None


async def test_a_header_name_that_is_not_utf8_stops_nothing(workers, ledger, settings, monkeypatch):
    """Regression: aiokafka decodes header names as strict UTF-8, so one record whose header name is
    raw bytes (any client writing bytes can send it) made every fetch of its partition raise, for
    ever. The worker now reads such a batch leniently (worker/adapter/fetch_guard.py); the unknown
    header is ignored, as the contract says, and the records around it are decided too."""
    import aiokafka.producer.message_accumulator as accumulator
    import aiokafka.producer.producer as producer_module
    from aiokafka import AIOKafkaProducer
    from aiokafka.record.default_records import _DefaultRecordBatchBuilderPy

    class RawName(str):  # a header name that encodes to bytes that are not UTF-8
        def encode(self, *args, **kwargs):
            return b"\xff\xfe-not-utf8"

    # This test's producer builds its batches with aiokafka's pure-Python builder, which takes the
    # name's bytes as given; restored after the test.
    monkeypatch.setattr(accumulator, "DefaultRecordBatchBuilder", _DefaultRecordBatchBuilderPy)
    monkeypatch.setattr(producer_module, "DefaultRecordBatchBuilder", _DefaultRecordBatchBuilderPy)

    worker = workers.start()
    await wait_until_serving(ledger)
    await ledger.open("w")
    await ledger.credit("w", 100)
    raw = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
    await raw.start()
    async with Topic(settings.kafka_bootstrap, [settings.topics.replies], settings.partitions) as replies:
        try:
            for name, bad in (("before", False), ("poison", True), ("after", False)):
                command = {"v": 1, "op": "charge", "id": name, "wallet": "w", "amount": 1}
                headers = [("reply_to", settings.topics.replies.encode()), ("correlation_id", name.encode())]
                if bad:
                    headers.append((RawName("x"), b"v"))
                await raw.send_and_wait(settings.topics.commands, json.dumps(command).encode(), key=b"w",
                                        headers=headers)  # fmt: skip
        finally:
            await raw.stop()
        wanted = {"before", "poison", "after"}
        deadline = asyncio.get_running_loop().time() + 60
        while not wanted <= {dict(r.headers).get("correlation_id", b"").decode() for r in replies.records}:
            assert asyncio.get_running_loop().time() < deadline, "a record was never answered: its partition is stuck"
            await asyncio.sleep(0.2)
    answers = {dict(r.headers)["correlation_id"].decode(): json.loads(r.value) for r in replies.records}
    assert [answers[name]["status"] for name in ("before", "poison", "after")] == [200, 200, 200], answers
    assert answers["after"]["balance"] == 97
    assert (await ledger.charge("w", 1)).balance == 96  # the partition goes on
    assert worker.poll() is None


async def test_a_compressed_batch_is_decided_whatever_its_codec(workers, ledger, settings):
    """Regression: a producer may compress its batches (gzip, snappy, lz4 or zstd: the broker keeps
    them as sent), and aiokafka decompresses all but gzip only with `cramjam` installed. Without it,
    one snappy batch (franz-go's default) made every fetch of its partition fail, for ever. The
    worker depends on cramjam; here librdkafka, which has every codec, sends a batch of each."""
    from confluent_kafka import Producer

    worker = workers.start()
    await wait_until_serving(ledger)
    await ledger.open("w")
    await ledger.credit("w", 100)
    codecs = ("gzip", "snappy", "lz4", "zstd")
    async with Topic(settings.kafka_bootstrap, [settings.topics.replies], settings.partitions) as replies:
        for codec in codecs:
            producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "compression.type": codec})
            command = {"v": 1, "op": "charge", "id": codec, "wallet": "w", "amount": 1}
            producer.produce(settings.topics.commands, json.dumps(command).encode(), b"w",
                             headers=[("reply_to", settings.topics.replies.encode()), ("correlation_id", codec.encode())])  # fmt: skip
            assert await asyncio.to_thread(producer.flush, 30) == 0, f"the {codec} batch was not acknowledged"
        deadline = asyncio.get_running_loop().time() + 60
        while not set(codecs) <= {dict(r.headers).get("correlation_id", b"").decode() for r in replies.records}:
            assert asyncio.get_running_loop().time() < deadline, "a compressed batch was never answered: its partition is stuck"
            await asyncio.sleep(0.2)
    answers = {dict(r.headers)["correlation_id"].decode(): json.loads(r.value) for r in replies.records}
    assert {codec: answers[codec]["status"] for codec in codecs} == dict.fromkeys(codecs, 200), answers
    assert (await ledger.charge("w", 1)).balance == 100 - len(codecs) - 1
    assert worker.poll() is None
