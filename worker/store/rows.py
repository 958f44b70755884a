"""What a batch writes and looks up, in the forms its statements take cheapest: pure, no I/O.

Measured with asyncpg on this machine (docs/design.md): a Python list bound to an array parameter
costs about 0.4 µs an element on the client (asyncpg checks every element against two abstract
base classes), so a batch's 15-column insert cost over 5 µs a row. Hence:

- decisions go by binary COPY, one tuple a row: about 1 µs a row;
- the outbox row of a batch is one `bytea`, its records as one MessagePack array (msgspec);
- lists of ids and integers go as one text parameter each, in PostgreSQL's array syntax, cast in
  the statement (`$1::text::text[]`): about 0.1 µs an element. Only values that need no quoting
  go this way: integers, and ids, wallets, holds and topics, whose patterns allow no quote,
  backslash, comma, brace or space.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from msgspec.msgpack import Decoder, Encoder

from worker.core.model import Decision
from worker.core.outgoing import Outgoing

DECISION_COLUMNS = ("wallet", "id", "seq", "op", "status", "error", "amount", "balance", "reserved", "at_ms",
                    "fingerprint", "memo", "partition", "offset", "reply")  # fmt: skip
_encode_records = Encoder().encode
_decode_records = Decoder(list[Outgoing]).decode


def decision_rows(stored: Sequence[Decision], replies: Sequence[bytes]) -> list[tuple]:
    """Rows of `decisions` (DECISION_COLUMNS) for stored decisions and their encoded replies."""
    rows = []
    for decision, encoded in zip(stored, replies, strict=True):
        reply, record, wallet = decision.reply, decision.parsed.record, decision.wallet
        assert wallet is not None
        rows.append((reply["wallet"], reply["id"], reply["seq"], reply["op"], reply["status"], reply["error"],
                     reply.get("amount"), wallet.balance, wallet.reserved, decision.at_ms, decision.fingerprint,
                     decision.memo, record.partition, record.offset, encoded.decode()))  # fmt: skip
    return rows


def encode_records(records: Sequence[Outgoing]) -> bytes:
    """A batch's records to publish, as the outbox row keeps them."""
    return _encode_records(records)


def decode_records(blob: bytes) -> list[Outgoing]:
    return _decode_records(blob)


def id_array(values: Sequence[str]) -> str:
    """A text[] literal of values matching the id (or topic) pattern: nothing in them needs escaping;
    each is quoted all the same, so that an id spelled NULL stays an id."""
    return '{"' + '","'.join(values) + '"}' if values else "{}"


def int_array(values: Iterable[int]) -> str:
    """A bigint[] (or integer[]) literal."""
    return "{" + ",".join(map(str, values)) + "}"


def bool_array(values: Iterable[bool]) -> str:
    return "{" + ",".join("t" if value else "f" for value in values) + "}"

