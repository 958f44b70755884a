"""The records a decision sends: its reply, its event, or its dead letter. Pure: bytes in, bytes out."""

from __future__ import annotations

from msgspec import Struct
from msgspec.json import Encoder

from worker.core.model import Decision, Record

JSON_HEADER = ("content-type", b"application/json")
_encode = Encoder().encode  # UTF-8 out, like json.dumps(ensure_ascii=False); 15× faster


class Outgoing(Struct, frozen=True, gc=False, array_like=True):
    topic: str
    partition: int | None  # None: placed by key, murmur2 like every other client
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...]


def encode(document: dict[str, object]) -> bytes:
    return _encode(document)


def outgoing(decision: Decision, events_topic: str, dlq_topic: str, commands_topic: str) -> list[Outgoing]:
    return rendered(decision, events_topic, dlq_topic, commands_topic)[1]


def rendered(decision: Decision, events_topic: str, dlq_topic: str,
             commands_topic: str) -> tuple[bytes, list[Outgoing]]:  # fmt: skip
    """The reply encoded once, and the records the decision sends: its reply (or dead letter) and,
    when stored, its event. The event is the reply's bytes with the command's place in the log
    appended, so a decision is encoded once however many records carry it; the stored reply is the
    same bytes again."""
    parsed = decision.parsed
    reply = decision.reply
    value = _encode(reply)
    wallet = reply["wallet"]
    key = wallet.encode() if wallet.__class__ is str else parsed.record.key
    records = []
    if parsed.dead_letter_reason is not None:
        records.append(dead_letter(parsed.record, parsed.dead_letter_reason, dlq_topic, commands_topic))
    elif parsed.reply_address is not None:
        address = parsed.reply_address
        correlation_id = address.correlation_id or reply["id"] or ""
        headers = (JSON_HEADER, ("correlation_id", correlation_id.encode()))
        records.append(Outgoing(address.topic, address.partition, key, value, headers))
    if decision.stored:
        record = parsed.record
        event = b'%s,"partition":%d,"offset":%d}' % (value[:-1], record.partition, record.offset)
        records.append(Outgoing(events_topic, None, key, event, _EVENT_HEADERS))
    return value, records


_EVENT_HEADERS = (JSON_HEADER,)


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

