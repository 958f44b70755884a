"""What a batch writes, as the columns its set-based statements take: pure, no I/O.

Each statement takes one array per column (`… FROM unnest($1, $2, …)`), so that a batch of any
size is a handful of statements. The columns are built row by row as tuples and turned into
arrays with one `zip`, which costs a fraction of appending to fifteen lists.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from worker.core.model import Decision
from worker.core.outgoing import JSON_HEADER, Outgoing

_JSON_HEADER_JSON = f'["{JSON_HEADER[0]}","{JSON_HEADER[1].hex()}"]'
_EVENT_HEADERS_JSON = f"[{_JSON_HEADER_JSON}]"
_REPLY_HEADERS_HEAD = f'[{_JSON_HEADER_JSON},["correlation_id","'


def decision_columns(stored: Sequence[Decision], replies: Sequence[bytes]) -> list[tuple]:
    """The 15 columns of `insert_decisions`, for stored decisions and their encoded replies."""
    rows = []
    for decision, encoded in zip(stored, replies, strict=True):
        reply, record, wallet = decision.reply, decision.parsed.record, decision.wallet
        assert wallet is not None
        rows.append((reply["wallet"], reply["id"], reply["seq"], reply["op"], reply["status"], reply["error"],
                     reply.get("amount"), wallet.balance, wallet.reserved, decision.at_ms, decision.fingerprint,
                     decision.memo, record.partition, record.offset, encoded.decode()))  # fmt: skip
    return list(zip(*rows, strict=True))


def outbox_columns(records: Sequence[Outgoing]) -> tuple[list, list, list, list, list]:
    """topics, partitions, keys, values and headers of one outbox row: a batch's records in order."""
    return ([r.topic for r in records], [r.partition for r in records], [r.key for r in records],
            [r.value for r in records], [encode_headers(r.headers) for r in records])  # fmt: skip


def encode_headers(headers: tuple[tuple[str, bytes], ...]) -> str:
    """JSON list of [name, hex of value]. A reply's and an event's headers, which are nearly all of
    them, are written without the JSON encoder."""
    if headers and headers[0] is JSON_HEADER:
        if len(headers) == 1:
            return _EVENT_HEADERS_JSON
        if len(headers) == 2 and headers[1][0] == "correlation_id":
            return f'{_REPLY_HEADERS_HEAD}{headers[1][1].hex()}"]]'
    return json.dumps([[name, value.hex()] for name, value in headers], separators=(",", ":"))


def decode_headers(text: str) -> tuple[tuple[str, bytes], ...]:
    return tuple((name, bytes.fromhex(value)) for name, value in json.loads(text))


def outbox_records(row) -> list[Outgoing]:
    """The records of one outbox row, in order."""
    return [Outgoing(topic, partition, key, value, decode_headers(headers))
            for topic, partition, key, value, headers in zip(row["topics"], row["partitions"], row["keys"],
                                                              row["values"], row["headers"], strict=True)]  # fmt: skip
