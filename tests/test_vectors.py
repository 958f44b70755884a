"""Every shared test vector of `schemas/vectors/` through the real worker, in order, one file a ledger."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import jsonschema
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from tests.conftest import ROOT, wait_until_serving

VECTORS = sorted((ROOT / "schemas" / "vectors").glob("*.json"))
SCHEMAS = {kind: json.loads((ROOT / "schemas" / f"{kind}.schema.json").read_text()) for kind in ("command", "reply")}
REGISTRY = Registry().with_resources(
    (schema["$id"], Resource.from_contents(schema, default_specification=DRAFT202012)) for schema in SCHEMAS.values()
)
REPLY_VALIDATOR = jsonschema.Draft202012Validator(SCHEMAS["reply"], registry=REGISTRY)
OUTCOME_TIMEOUT_S = 30


class Topic:
    """Reads every record of a topic into memory, from its beginning."""

    def __init__(self, bootstrap: str, name: str, partitions: int) -> None:
        self.records: list = []
        self._consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
        self._parts = [TopicPartition(name, p) for p in range(partitions)]

    async def __aenter__(self) -> Topic:
        await self._consumer.start()
        self._consumer.assign(self._parts)
        await self._consumer.seek_to_beginning(*self._parts)
        self._task = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        while True:
            for batch in (await self._consumer.getmany(timeout_ms=50)).values():
                self.records.extend(batch)

    async def __aexit__(self, *exc) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self._consumer.stop()

    async def first(self, match) -> object:
        for _ in range(OUTCOME_TIMEOUT_S * 20):
            found = next((r for r in self.records if match(r)), None)
            if found is not None:
                return found
            await asyncio.sleep(0.05)
        raise AssertionError("no matching record arrived")


def headers_of(case: dict, prefix: str, correlation_id: str) -> list[tuple[str, bytes]]:
    given = {name: value.replace("{prefix}", prefix) for name, value in case["record"].get("headers", {}).items()}
    if not case.get("no_reply_to"):
        given.setdefault("reply_to", f"{prefix}.replies")
        given.setdefault("correlation_id", correlation_id)
    return [(name, value.encode()) for name, value in given.items()]


def value_of(record: dict) -> bytes | None:
    if "value_text" in record:
        return record["value_text"].encode()
    if "value" in record:
        return json.dumps(record["value"], separators=(",", ":"), ensure_ascii=False).encode()
    return None


@pytest.mark.parametrize("path", VECTORS, ids=[p.stem for p in VECTORS])
async def test_vectors(path: Path, workers, ledger, settings):
    cases = json.loads(path.read_text())["cases"]
    workers.start()
    await wait_until_serving(ledger)
    prefix = settings.topics.prefix
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        async with Topic(settings.kafka_bootstrap, settings.topics.replies, settings.partitions) as replies, \
                Topic(settings.kafka_bootstrap, settings.topics.dlq, settings.partitions) as dlq:  # fmt: skip
            for case in cases:
                try:
                    await run_case(case, prefix, producer, replies, dlq, settings)
                except AssertionError as error:
                    raise AssertionError(f"vector {case['name']!r}: {error}") from error
    finally:
        await producer.stop()


async def run_case(case, prefix, producer, replies, dlq, settings) -> None:
    correlation_id = uuid.uuid4().hex
    headers = headers_of(case, prefix, correlation_id)
    correlation_id = dict(headers).get("correlation_id", correlation_id.encode()).decode()
    key = case["record"].get("key")
    sent = await producer.send_and_wait(
        settings.topics.commands, value_of(case["record"]), key=None if key is None else key.encode(), headers=headers
    )
    expect = case["expect"]
    name = case["name"]
    if "dlq" in expect:
        record = await dlq.first(lambda r: dict(r.headers).get("source_offset") == str(sent.offset).encode()
                                 and dict(r.headers).get("source_partition") == str(sent.partition).encode())  # fmt: skip
        reason = dict(record.headers)["reason"].decode()
        assert expect["dlq"]["reason_contains"] in reason, (name, reason)
        return
    record = await replies.first(lambda r: dict(r.headers).get("correlation_id") == correlation_id.encode()
                                 and r.timestamp >= sent.timestamp)  # fmt: skip
    reply = json.loads(record.value)
    REPLY_VALIDATOR.validate(reply)  # every reply the worker produces fits the published schema
    for field, value in expect["reply"].items():
        assert reply.get(field, "<absent>") == value, (name, field, reply)
    for field in expect.get("absent", ()):
        assert field not in reply, (name, field, reply)
    if "message_contains" in expect:
        assert expect["message_contains"] in reply["message"], (name, reply["message"])
