"""What a batch writes and looks up, in the forms its statements take cheapest: pure, no I/O.

Measured with asyncpg on this machine (docs/design.md): a Python list bound to an array parameter
costs about 0.4 µs an element on the client (asyncpg checks every element against two abstract
base classes), so a batch's 15-column insert cost over 5 µs a row. Hence:

- a batch's whole transaction is one call of `floorguard_commit` (queries.sql, `commit_batch`):
  its decisions go in column by column, thirteen columns as text literals and only the two that
  may hold any character (memo, reply) as lists;
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

_encode_records = Encoder().encode
_decode_records = Decoder(list[Outgoing]).decode


def decision_columns(stored: Sequence[Decision], replies: Sequence[bytes]) -> tuple:
    """The `decisions` rows of stored decisions and their encoded replies, column by column, as
    `commit_batch` takes them ($22 to $36): wallet, id, seq, op, status, error, amount, balance,
    reserved, at_ms, fingerprint, memo, partition, offset, reply. One pass, then one join a column."""
    ids: list[str] = []
    words: list[str] = []  # wallet, op and fingerprint: values that need no quoting, three a row
    numbers: list[int] = []  # seq, status, balance, reserved, at_ms, partition, offset: seven a row
    nullable: list[object] = []  # error, amount: two a row
    memos: list[str | None] = []
    for decision in stored:
        reply, wallet, record = decision.reply, decision.wallet, decision.parsed.record
        assert wallet is not None
        ids.append(reply["id"])
        words += (reply["wallet"], reply["op"], decision.fingerprint)
        numbers += (reply["seq"], reply["status"], wallet.balance, wallet.reserved, decision.at_ms, record.partition,
                    record.offset)  # fmt: skip
        nullable += (reply["error"], reply.get("amount"))
        memos.append(decision.memo)
    return (id_array(words[0::3]), id_array(ids), int_array(numbers[0::7]), id_array(words[1::3]),
            int_array(numbers[1::7]), nullable_array(nullable[0::2]), nullable_array(nullable[1::2]),
            int_array(numbers[2::7]), int_array(numbers[3::7]), int_array(numbers[4::7]), id_array(words[2::3]),
            memos, int_array(numbers[5::7]), int_array(numbers[6::7]), [encoded.decode() for encoded in replies])  # fmt: skip


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


def nullable_array(values: Iterable[int | str | None]) -> str:
    """An array literal of integers and words (error codes: no quoting needed), None as NULL."""
    return "{" + ",".join("NULL" if value is None else str(value) for value in values) + "}"


def bool_array(values: Iterable[bool]) -> str:
    return "{" + ",".join("t" if value else "f" for value in values) + "}"

