"""The records a decision sends: its reply, its event, or its dead letter. Pure: bytes in, bytes out."""

from __future__ import annotations

import json
from dataclasses import dataclass

from worker.core.decide import event
from worker.core.model import Decision, Record

JSON_HEADER = ("content-type", b"application/json")


@dataclass(frozen=True, slots=True)
class Outgoing:
    topic: str
    partition: int | None  # None: placed by key, murmur2 like every other client
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...]


def encode(document: dict[str, object]) -> bytes:
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


def outgoing(decision: Decision, events_topic: str, dlq_topic: str, commands_topic: str) -> list[Outgoing]:
    parsed = decision.parsed
    records = []
    if parsed.dead_letter_reason is not None:
        records.append(dead_letter(parsed.record, parsed.dead_letter_reason, dlq_topic, commands_topic))
    elif parsed.reply_address is not None:
        address = parsed.reply_address
        correlation_id = address.correlation_id or decision.reply["id"] or ""
        records.append(
            Outgoing(
                address.topic,
                address.partition,
                _wallet_key(decision),
                encode(decision.reply),
                (JSON_HEADER, ("correlation_id", correlation_id.encode())),
            )
        )
    if decision.stored:
        records.append(Outgoing(events_topic, None, _wallet_key(decision), encode(event(decision)), (JSON_HEADER,)))
    return records


def dead_letter(record: Record, reason: str, dlq_topic: str, source_topic: str) -> Outgoing:
    """The record as it came, with why it could not be answered and where it came from."""
    headers = (
        *record.headers,
        ("reason", reason.encode()),
        ("source_topic", source_topic.encode()),
        ("source_partition", str(record.partition).encode()),
        ("source_offset", str(record.offset).encode()),
    )
    return Outgoing(dlq_topic, None, record.key, record.value or b"", headers)


def _wallet_key(decision: Decision) -> bytes | None:
    wallet = decision.reply.get("wallet")
    return wallet.encode() if isinstance(wallet, str) else decision.parsed.record.key
