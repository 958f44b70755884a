"""From a raw command record to a `Command` or an `Invalid` (422), by the contract's rules.

Strict on purpose: floats, exponents, booleans, strings and null are not money; unknown fields,
duplicate keys and out-of-range numbers are refused, so that a typo never passes silently.

Two paths, one answer. `parse` first tries the common case: a well-formed command, decoded by
msgspec into a typed structure while it is validated (about 4 µs a record with its checks, where
the thorough path took 25: `loadtest/hotpath.py`). Anything that path does not accept outright, it hands to `parse_thorough`, which
finds the field to name in the 422. A test holds the two together on every record the fuzzer
makes: the fast path only ever answers what the thorough one would.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Collection, Iterable
from typing import Any

from msgspec import DecodeError
from msgspec.json import Decoder

from worker.core.auth import AUTH_HEADER, credentials
from worker.core.codes import SAFE_INTEGER_MAX, Op
from worker.core.model import Command, Invalid, Parsed, Record, ReplyAddress, Usage
from worker.core.placement import partition_of

VALUE_SIZE_MAX_BYTES = 16 * 1024
MEMO_LENGTH_MAX_CHARS = 256
CORRELATION_ID_SIZE_MAX_BYTES = 255
TOPIC_NAME_LENGTH_MAX_CHARS = 249
MODEL_LENGTH_MAX_CHARS = 128
TTL_MAX_MS = 86_400_000
INTEGER_DIGITS_MAX = 20  # far past 2^53; stops a 16 KiB number before Python's int parser sees it

ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")
TOPIC_NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,249}")
REPLY_HEADERS = ("reply_to", "correlation_id", "reply_partition")

KNOWN_FIELDS = ("v", "op", "id", "wallet", "amount", "usage", "floor", "hold", "ttl_ms", "memo")
# The fields each op takes beyond v, op, id, wallet and memo; True marks a required one.
OP_FIELDS: dict[Op, dict[str, bool]] = {
    Op.OPEN: {"floor": False},
    Op.CREDIT: {"amount": True},
    Op.CHARGE: {"amount": False, "usage": False},
    Op.RESERVE: {"amount": False, "usage": False, "ttl_ms": False},
    Op.EXTEND: {"hold": True, "amount": True, "ttl_ms": False},
    Op.CAPTURE: {"hold": True, "amount": False, "usage": False},
    Op.RELEASE: {"hold": True},
    Op.EXPIRE: {"hold": True},
}


class _NotAnInteger:
    """Stands in for a JSON number that is not a plain integer (a fraction, an exponent, or too
    many digits), so that the field it sits in is named in the 422."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


class _Malformed(Exception):
    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


def parse(record: Record, forbidden_reply_topics: Collection[str], partitions: int | None = None) -> Parsed:
    """Parse one record. Never raises for bad input: every problem becomes an `Invalid`.

    With `partitions` (the commands topic's partition count), a record that is not on the
    partition Kafka's default partitioner picks for its key is refused (D33): a wallet's commands
    must all reach the one writer of its partition.
    """
    parsed = _well_formed(record, forbidden_reply_topics, partitions)
    return parsed if parsed is not None else parse_thorough(record, forbidden_reply_topics, partitions)


def parse_thorough(record: Record, forbidden_reply_topics: Iterable[str], partitions: int | None = None) -> Parsed:
    """Parse one record field by field, naming what is wrong. Never raises for bad input."""
    reply_address, address_problem = _reply_address(record, frozenset(forbidden_reply_topics))
    command = _command(record, partitions)
    signed = credentials(record)
    if address_problem is not None:
        # A broken reply address is a 422 of its own, whatever the value says.
        invalid = address_problem if isinstance(command, Command) else command
        return Parsed(record, _as_invalid(invalid, address_problem), None, address_problem.message, signed)
    if isinstance(command, Invalid) and reply_address is None:
        return Parsed(record, command, None, f"no reply_to header to answer with: {command.message}", signed)
    return Parsed(record, command, reply_address, None, signed)


def _as_invalid(command: Command | Invalid, fallback: Invalid) -> Invalid:
    if isinstance(command, Invalid):
        return command
    return Invalid(fallback.field, fallback.problem, command.id, command.wallet, command.op.value)


# --- the common case ----------------------------------------------------------------------------


_decode_command = Decoder(Command).decode
_NAMES_CACHED_MAX = 100_000
_good_wallets: set[str] = set()  # wallet names already found to match the id pattern
_good_topics: set[str] = set()  # reply topics already found to be legal topic names
_good_id = ID_PATTERN.fullmatch
_QUOTE = ord('"')
_OPTIONAL = ("amount", "usage", "floor", "hold", "ttl_ms")
# Per op: the optional fields it does not take, and those it requires (beyond v, op, id, wallet).
_NOT_TAKEN = {op: tuple(name for name in _OPTIONAL if name not in fields) for op, fields in OP_FIELDS.items()}
_REQUIRED = {op: tuple(name for name, required in fields.items() if required) for op, fields in OP_FIELDS.items()}
_CHARGE_OR_RESERVE = (Op.CHARGE, Op.RESERVE)


def _well_formed(record: Record, forbidden: Collection[str], partitions: int | None) -> Parsed | None:
    """The record as a `Parsed` when it is a well-formed command with a usable (or no) reply
    address; None whenever anything is unusual, for `parse_thorough` to decide.

    msgspec decodes the value straight into a `Command`, refusing wrong types, unknown fields and
    unknown ops. What it lets through that the contract refuses, the JSON strings are counted to
    catch: a key given twice (msgspec keeps the last), a null (read as an absent field) and a
    missing `v` (read as 1) each leave more quoted strings in the value than the command has
    keys and string values. Counting is exact only without escapes, so a value with a backslash
    takes the thorough path.
    """
    value = record.value
    if value is None or len(value) > VALUE_SIZE_MAX_BYTES or b"\\" in value:
        return None
    reply_to = correlation = None
    signed: Any = "missing"
    for name, header in record.headers:
        if name == "reply_to":
            if reply_to is not None:
                return None
            reply_to = header
        elif name == "correlation_id":
            if correlation is not None or header.__class__ is not bytes or len(header) > CORRELATION_ID_SIZE_MAX_BYTES:
                return None
            correlation = header
        elif name == "reply_partition":
            return None
        elif name == AUTH_HEADER:
            signed = None
    try:
        command = _decode_command(value)
    except (DecodeError, UnicodeDecodeError):
        return None
    op, command_id, wallet = command.op, command.id, command.wallet
    if command.v != 1 or not _good_id(command_id):
        return None
    if wallet not in _good_wallets and not _remember(wallet, _good_id, _good_wallets):
        return None
    key = record.key
    if key != wallet.encode() or (partitions is not None and partition_of(key, partitions) != record.partition):
        return None
    # JSON strings: the keys v, op, id and wallet, and the values of op, id and wallet, then each
    # optional field's key and, for hold and memo, its value; usage adds three keys and a model.
    strings = 7
    for name in _NOT_TAKEN[op]:
        if getattr(command, name) is not None:
            return None
    for name in _REQUIRED[op]:
        if getattr(command, name) is None:
            return None
    amount, usage, floor, hold, ttl_ms, memo = (command.amount, command.usage, command.floor, command.hold,
                                                command.ttl_ms, command.memo)  # fmt: skip
    if amount is not None:
        strings += 1
        if not (0 if op is Op.CAPTURE else 1) <= amount <= SAFE_INTEGER_MAX:
            return None
        if usage is not None:
            return None
    elif usage is None and op in _CHARGE_OR_RESERVE:
        return None
    if usage is not None:
        strings += 5
        model = usage.model
        if (not 1 <= len(model) <= MODEL_LENGTH_MAX_CHARS or not model.isprintable()
                or not 0 <= usage.input_tokens <= SAFE_INTEGER_MAX or not 0 <= usage.output_tokens <= SAFE_INTEGER_MAX):  # fmt: skip
            return None
    if floor is not None:
        strings += 1
        if not -SAFE_INTEGER_MAX <= floor <= 0:
            return None
    if hold is not None:
        strings += 2
        if not _good_id(hold):
            return None
    if ttl_ms is not None:
        strings += 1
        if not 1 <= ttl_ms <= TTL_MAX_MS:
            return None
    if memo is not None:
        strings += 2
        if len(memo) > MEMO_LENGTH_MAX_CHARS or "\x00" in memo:
            return None
    if op is Op.EXPIRE:
        if command_id != f"expire:{hold}":
            return None
    elif command_id.startswith("expire:"):
        return None
    if value.count(_QUOTE) != 2 * strings:
        return None
    address = None
    if reply_to is not None:
        topic = _reply_topic(reply_to, forbidden)
        if topic is None:
            return None
        try:
            correlation_id = correlation.decode() if correlation is not None else ""
        except UnicodeDecodeError:
            return None
        address = ReplyAddress(topic, correlation_id, None)
    if signed is None:
        signed = credentials(record)
    return Parsed(record, command, address, None, signed)


def _reply_topic(raw: bytes, forbidden: Collection[str]) -> str | None:
    if raw.__class__ is not bytes:
        return None
    try:
        topic = raw.decode()
    except UnicodeDecodeError:
        return None
    if topic in forbidden or topic in (".", ".."):
        return None
    if topic in _good_topics or _remember(topic, TOPIC_NAME_PATTERN.fullmatch, _good_topics):
        return topic
    return None


def _remember(name: str, matches: Callable[[str], object], good: set[str]) -> bool:
    """Whether the name matches its pattern; a good one is remembered, so that a name seen again
    (a busy wallet, the one reply topic of an agent) costs a set lookup, not a regex."""
    if not matches(name):
        return False
    if len(good) >= _NAMES_CACHED_MAX:
        good.clear()
    good.add(name)
    return True


# --- headers --------------------------------------------------------------------------------


def _reply_address(
    record: Record, forbidden: frozenset[str]
) -> tuple[ReplyAddress | None, Invalid | None]:
    """The reply address, or the reason it is unusable. No `reply_to` means no reply at all."""
    values: dict[str, bytes] = {}
    for name, value in record.headers:
        if name in REPLY_HEADERS:
            if name in values:
                return None, Invalid(name, "header repeated")
            values[name] = value if isinstance(value, bytes) else b""
    if "reply_to" not in values:
        return None, None
    topic = _text(values["reply_to"])
    if topic is None or not TOPIC_NAME_PATTERN.fullmatch(topic) or topic in (".", ".."):
        return None, Invalid("reply_to", "not a legal topic name")
    if topic in forbidden:
        return None, Invalid("reply_to", f"{topic} is not a reply topic")
    correlation_id = None
    if "correlation_id" in values:
        raw = values["correlation_id"]
        correlation_id = _text(raw)
        if correlation_id is None or len(raw) > CORRELATION_ID_SIZE_MAX_BYTES:
            return None, Invalid("correlation_id", "not UTF-8 text of at most 255 bytes")
    return ReplyAddress(topic, correlation_id or "", reply_partition(record)[0]), None


def reply_partition(record: Record) -> tuple[int | None, Invalid | None]:
    """The `reply_partition` header: ASCII decimal, or absent."""
    for name, value in record.headers:
        if name == "reply_partition":
            text = _text(value)
            if text is None or not text.isascii() or not text.isdecimal() or len(text) > 9:
                return None, Invalid("reply_partition", "not an ASCII decimal partition number")
            return int(text), None
    return None, None


def _text(value: bytes | None) -> str | None:
    try:
        return (value or b"").decode("utf-8")
    except UnicodeDecodeError:
        return None


# --- value ----------------------------------------------------------------------------------


def _command(record: Record, partitions: int | None) -> Command | Invalid:
    try:
        fields = _json_object(record.value)
    except _Malformed as error:
        return Invalid(error.field, error.problem)
    echo = _echo(fields)
    try:
        command = _fields_to_command(fields)
        partition_problem = reply_partition(record)[1]
        if partition_problem is not None:
            raise _Malformed(partition_problem.field, partition_problem.problem)
        if record.key is None or _text(record.key) != command.wallet:
            raise _Malformed("key", "the record key must equal wallet")
        if partitions is not None and (placed := partition_of(record.key, partitions)) != record.partition:
            raise _Malformed("key", f"the record is on partition {record.partition}; Kafka's default partitioner "
                                    f"(murmur2) places this key on partition {placed}")  # fmt: skip
    except _Malformed as error:
        return Invalid(error.field, error.problem, **echo)
    return command


def _json_object(value: bytes | None) -> dict[str, Any]:
    if value is None:
        raise _Malformed("value", "missing")
    if len(value) > VALUE_SIZE_MAX_BYTES:
        raise _Malformed("value", f"larger than {VALUE_SIZE_MAX_BYTES} bytes")
    text = _text(value)
    if text is None:
        raise _Malformed("value", "not UTF-8")
    try:
        document = json.loads(
            text,
            object_pairs_hook=_object_without_duplicates,
            parse_float=_NotAnInteger,
            parse_int=_integer,
            parse_constant=_not_json,
        )
    except _Malformed:
        raise
    except (ValueError, RecursionError) as error:
        raise _Malformed("value", f"not JSON ({error.__class__.__name__})") from None
    if not isinstance(document, dict):
        raise _Malformed("value", "not a JSON object")
    return document


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document: dict[str, Any] = {}
    for name, value in pairs:
        if name in document:
            raise _Malformed("value", f"duplicate key {_field_name(name)}")  # quoted short (D3)
        document[name] = value
    return document


def _not_json(text: str) -> None:
    raise _Malformed("value", f"not JSON ({text} is no JSON number)")


def _integer(text: str) -> int | _NotAnInteger:
    if len(text.lstrip("-")) > INTEGER_DIGITS_MAX:
        return _NotAnInteger(text)
    return int(text)


def _echo(fields: dict[str, Any]) -> dict[str, str | None]:
    """The id, wallet and op a 422 reply may repeat: only values that pass their own check."""
    op = fields.get("op")
    op = op if isinstance(op, str) and op in Op._value2member_map_ else None
    command_id = fields.get("id")
    return {
        # An expire's own check is expire:<hold>: an id of the common form fails it, and is not echoed.
        "id": _valid_expire_id(command_id) if op == Op.EXPIRE else _valid_id(command_id),
        "wallet": _valid_id(fields.get("wallet")),
        "op": op,
    }


def _valid_id(value: Any) -> str | None:
    return value if isinstance(value, str) and ID_PATTERN.fullmatch(value) else None


def _valid_expire_id(value: Any) -> str | None:
    return value if isinstance(value, str) and value.startswith("expire:") and _valid_id(value[7:]) else None


def _fields_to_command(fields: dict[str, Any]) -> Command:
    for name in fields:
        if name not in KNOWN_FIELDS:
            raise _Malformed(_field_name(name), "unknown field")
    if "v" not in fields:
        raise _Malformed("v", "required")
    if type(fields["v"]) is not int or fields["v"] != 1:
        raise _Malformed("v", "must be 1")
    op = _op(fields)
    command_id = _id(fields, "id") if op is not Op.EXPIRE else _expire_id(fields)
    if op is not Op.EXPIRE and command_id.startswith("expire:"):
        # Else a command could take the id of a hold's expire and keep that hold from expiring.
        raise _Malformed("id", "the prefix expire: is reserved for the sweeper's expire")
    wallet = _id(fields, "wallet")
    taken = OP_FIELDS[op]
    for name in ("amount", "usage", "floor", "hold", "ttl_ms"):
        if name in fields and name not in taken:
            raise _Malformed(name, f"not allowed for op {op.value}")
    for name, required in taken.items():
        if required and name not in fields:
            raise _Malformed(name, "required")
    capture = op is Op.CAPTURE
    amount = _money(fields, "amount", minimum=0 if capture else 1, maximum=SAFE_INTEGER_MAX)
    usage = _usage(fields)
    if amount is not None and usage is not None:
        raise _Malformed("usage", "give amount or usage, not both")
    if op in (Op.CHARGE, Op.RESERVE) and amount is None and usage is None:
        raise _Malformed("amount", "required (or usage)")
    floor = _money(fields, "floor", minimum=-SAFE_INTEGER_MAX, maximum=0)
    hold = _id(fields, "hold") if "hold" in fields else None
    if op is Op.EXPIRE and command_id != f"expire:{hold}":
        raise _Malformed("id", "must be expire:<hold>")
    ttl_ms = _money(fields, "ttl_ms", minimum=1, maximum=TTL_MAX_MS)
    return Command(op, command_id, wallet, amount=amount, usage=usage, floor=floor, hold=hold, ttl_ms=ttl_ms,
                   memo=_memo(fields))  # fmt: skip


def _expire_id(fields: dict[str, Any]) -> str:
    """The sweeper's id, `expire:` and the hold's id: the one id past the common pattern."""
    value = fields.get("id")
    if "id" not in fields:
        raise _Malformed("id", "required")
    if _valid_expire_id(value) is None:
        raise _Malformed("id", "must be expire:<hold>")
    return value


def _usage(fields: dict[str, Any]) -> Usage | None:
    if "usage" not in fields:
        return None
    usage = fields["usage"]
    if not isinstance(usage, dict):
        raise _Malformed("usage", "must be an object")
    for name in usage:
        if name not in ("model", "input_tokens", "output_tokens"):
            raise _Malformed(f"usage.{_field_name(name)}", "unknown field")
    model = usage.get("model")
    if not isinstance(model, str) or not 1 <= len(model) <= MODEL_LENGTH_MAX_CHARS or not model.isprintable():
        raise _Malformed("usage.model", f"must be a printable string of 1 … {MODEL_LENGTH_MAX_CHARS} characters")
    tokens = [_money(usage, name, minimum=0, maximum=SAFE_INTEGER_MAX, path="usage.") for name in ("input_tokens", "output_tokens")]
    if tokens[0] is None or tokens[1] is None:
        missing = "usage.input_tokens" if tokens[0] is None else "usage.output_tokens"
        raise _Malformed(missing, "required")
    return Usage(model, tokens[0], tokens[1])


def _field_name(name: str) -> str:
    """A field name safe to quote in a message: printable and bounded."""
    shown = "".join(c if c.isprintable() else "?" for c in name[:64])
    return shown if shown else "''"


def _op(fields: dict[str, Any]) -> Op:
    if "op" not in fields:
        raise _Malformed("op", "required")
    value = fields["op"]
    if not isinstance(value, str) or value not in Op._value2member_map_:
        raise _Malformed("op", "unknown op")
    return Op(value)


def _id(fields: dict[str, Any], name: str) -> str:
    if name not in fields:
        raise _Malformed(name, "required")
    value = _valid_id(fields[name])
    if value is None:
        raise _Malformed(name, "must match ^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")
    return value


def _money(fields: dict[str, Any], name: str, *, minimum: int, maximum: int, path: str = "") -> int | None:
    """An integer field (money, tokens, milliseconds) within its bounds."""
    if name not in fields:
        return None
    value = fields[name]
    if type(value) is not int:  # bool is an int subclass, and is refused here too
        raise _Malformed(path + name, "must be a JSON integer (no fraction, exponent, string or null)")
    if not minimum <= value <= maximum:
        raise _Malformed(path + name, f"must lie within {minimum} … {maximum}")
    return value


def _memo(fields: dict[str, Any]) -> str | None:
    if "memo" not in fields:
        return None
    value = fields["memo"]
    if not isinstance(value, str) or len(value) > MEMO_LENGTH_MAX_CHARS:
        raise _Malformed("memo", f"must be a string of at most {MEMO_LENGTH_MAX_CHARS} characters")
    if not _storable(value):
        raise _Malformed("memo", "must be Unicode text without NUL (no \\u0000, no lone surrogate)")
    return value


def _storable(text: str) -> bool:
    """Text PostgreSQL can store. JSON escapes can spell NUL and lone surrogates; stored, they
    would fail the batch's INSERT with an error no retry cures, and stop the worker (D31)."""
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
