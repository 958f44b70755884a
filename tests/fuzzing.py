"""Broken command records for the fuzz tests, each with the answer the contract promises for it.

`broken_record` starts from a valid command of some op and applies one mutation that must break
it: a field of the wrong type or out of range, a float or an exponent where an integer belongs, a
field the op does not take, an unknown field or op, a missing field, a key that is not the wallet,
a value that is not JSON, not UTF-8 or over 16 KiB, broken reply headers, a reply topic that does
not exist or that names one of the ledger's own topics. Its `Expect` says what must come back: a
422 reply whose message starts with the field's name, or a dead letter whose reason names it.
`garbage_record` is random bytes or random JSON, for which only a weaker property holds.

Every choice goes through a `Chooser`, so that one grammar serves twice: driven by hypothesis
(`HypothesisChooser`, which shrinks a failure to its smallest record) against the parser in
process, and driven by a seeded `random.Random` (`RandomChooser`, ~100 times faster) to make the
hundred thousand records the real worker is sent.

The expectations are written from the contract (docs/contract.md), not from the parser, so that
the parser is checked against it; only the id pattern and the limits are repeated here.
"""

from __future__ import annotations

import json
import random
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, TypeVar

from hypothesis import strategies as st

T = TypeVar("T")

SAFE_INTEGER_MAX = 2**53 - 1
VALUE_SIZE_MAX_BYTES = 16 * 1024
TTL_MAX_MS = 86_400_000
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")
TOPIC_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,249}")
ID_ALPHABET = string.ascii_letters + string.digits + "._:@-"
TOPIC_ALPHABET = string.ascii_letters + string.digits + "._-"
OPS = ("open", "credit", "charge", "reserve", "extend", "capture", "release", "expire")
KNOWN_FIELDS = ("v", "op", "id", "wallet", "amount", "usage", "floor", "hold", "ttl_ms", "memo")
USAGE_FIELDS = ("model", "input_tokens", "output_tokens")
# Per op, the fields it takes beyond v, op, id, wallet and memo (docs/contract.md, "Value").
OP_FIELDS = {
    "open": ("floor",),
    "credit": ("amount",),
    "charge": ("amount", "usage"),
    "reserve": ("amount", "usage", "ttl_ms"),
    "extend": ("hold", "amount", "ttl_ms"),
    "capture": ("hold", "amount", "usage"),
    "release": ("hold",),
    "expire": ("hold",),
}
INTEGER_BOUNDS = {
    "floor": (-SAFE_INTEGER_MAX, 0),
    "ttl_ms": (1, TTL_MAX_MS),
    "input_tokens": (0, SAFE_INTEGER_MAX),
    "output_tokens": (0, SAFE_INTEGER_MAX),
}
# Every field a 422 may name (D3): JSON fields, usage's, the reply headers, the key and the value.
NAMED_FIELDS = frozenset(
    {*KNOWN_FIELDS, *(f"usage.{name}" for name in USAGE_FIELDS), "reply_to", "correlation_id",
     "reply_partition", "key", "value"}
)  # fmt: skip
UNKNOWN_FIELD = ": unknown field"  # how a 422 names a field the contract does not know (D12)


# --- choices ------------------------------------------------------------------------------------


class Chooser:
    """Every random choice of the grammar. Subclasses give four primitives; the rest derives."""

    def pick(self, options: Sequence[T]) -> T:
        raise NotImplementedError

    def integer(self, minimum: int, maximum: int) -> int:
        raise NotImplementedError

    def text(self, minimum: int, maximum: int, alphabet: str | None = None) -> str:
        """Any Unicode text but lone surrogates when no alphabet is given."""
        raise NotImplementedError

    def binary(self, minimum: int, maximum: int) -> bytes:
        raise NotImplementedError

    def boolean(self) -> bool:
        return self.integer(0, 1) == 1

    def one_in(self, n: int) -> bool:
        return self.integer(1, n) == 1

    def either(self, *makers: Callable[[], T]) -> T:
        return self.pick(makers)()

    def until(self, make: Callable[[], T], accept: Callable[[T], bool]) -> T:
        for _ in range(1000):
            value = make()
            if accept(value):
                return value
        raise AssertionError("the grammar rejects almost everything it makes")


class RandomChooser(Chooser):
    # Mostly ASCII, some of the rest of Unicode: control characters, accents, emoji, NUL.
    _CHARACTER_RANGES = ((32, 126),) * 6 + ((0, 31), (127, 0x2FF), (0x300, 0xD7FF), (0xE000, 0xFFFF),
                                             (0x10000, 0x10FFFF))  # fmt: skip

    def __init__(self, seed: int) -> None:
        self._random = random.Random(seed)

    def pick(self, options: Sequence[T]) -> T:
        return options[self._random.randrange(len(options))]

    def integer(self, minimum: int, maximum: int) -> int:
        return self._random.randint(minimum, maximum)

    def text(self, minimum: int, maximum: int, alphabet: str | None = None) -> str:
        size = self._random.randint(minimum, maximum)
        if alphabet is not None:
            return "".join(self._random.choices(alphabet, k=size))
        ranges = self._random.choices(self._CHARACTER_RANGES, k=size)
        return "".join(chr(self._random.randint(low, high)) for low, high in ranges)

    def binary(self, minimum: int, maximum: int) -> bytes:
        return self._random.randbytes(self._random.randint(minimum, maximum))


class HypothesisChooser(Chooser):
    def __init__(self, data: st.DataObject) -> None:
        self._data = data

    def pick(self, options: Sequence[T]) -> T:
        return self._data.draw(st.sampled_from(options))

    def integer(self, minimum: int, maximum: int) -> int:
        return self._data.draw(st.integers(minimum, maximum))

    def text(self, minimum: int, maximum: int, alphabet: str | None = None) -> str:
        characters = st.characters(exclude_categories=("Cs",)) if alphabet is None else st.sampled_from(alphabet)
        return self._data.draw(st.text(characters, min_size=minimum, max_size=maximum))

    def binary(self, minimum: int, maximum: int) -> bytes:
        return self._data.draw(st.binary(min_size=minimum, max_size=maximum))


# --- what is sent and what must come back ----------------------------------------------------------


class Outcome(Enum):
    REPLY = "a 422 reply on reply_to"
    DEAD_LETTER = "the record itself on the dead-letter topic"
    REPLY_DEAD_LETTER = "the 422 reply on the dead-letter topic: its reply topic does not exist"


@dataclass(frozen=True)
class Expect:
    outcome: Outcome
    field: str | None  # the field the 422 names; None for garbage: any field the contract knows


@dataclass(frozen=True)
class Case:
    """One record to send. `correlated`: a unique correlation_id header is added when it is sent."""

    mutation: str
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...]
    correlated: bool
    expect: Expect


@dataclass(frozen=True)
class World:
    """What the records are aimed at: funded wallets with an open hold each, and the topics."""

    wallets: tuple[str, ...]
    holds: dict[str, str]  # wallet -> its open hold
    reply_topic: str
    reply_partitions: int
    ledger_topics: tuple[str, ...]  # commands, events, dlq: never a reply topic
    missing_topics: tuple[str, ...]  # legal names of topics that do not exist


def names_field(message: str, field: str) -> bool:
    return message.startswith(f"{field}: ")


def names_a_known_field(message: str) -> bool:
    """The weak property of garbage: the message is `<field>: …` for a field the contract names."""
    return message.split(": ", 1)[0] in NAMED_FIELDS or message.endswith(UNKNOWN_FIELD)


# --- JSON as written, including what no serializer writes -----------------------------------------


class Raw:
    """JSON text written as it is: numbers no Python value serializes to (1e3, 1.0, NaN)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return f"Raw({self.text!r})"


@dataclass
class Pairs:
    """A JSON object as a list of pairs, so that a key can repeat."""

    items: list[tuple[str, Any]] = field(default_factory=list)


def to_json(value: Any) -> str:
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        value = Pairs(list(value.items()))
    if isinstance(value, Pairs):
        return "{" + ",".join(f"{to_json(k)}:{to_json(v)}" for k, v in value.items) + "}"
    if isinstance(value, list):
        return "[" + ",".join(to_json(item) for item in value) + "]"
    if isinstance(value, str) and not is_unicode(value):
        return json.dumps(value)  # a lone surrogate as its \u escape: legal JSON, but no Unicode text
    return json.dumps(value, ensure_ascii=False)


def encode(value: Any) -> bytes:
    return json_text(value).encode()


def json_text(value: Any) -> str:
    """`to_json`, by the standard library when it can write the value (five times faster)."""
    try:
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
        text.encode()
    except (TypeError, UnicodeEncodeError):  # a Raw or a Pairs in it, or a lone surrogate
        return to_json(value)
    return text


def is_unicode(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def is_utf8(raw: bytes) -> bool:
    try:
        raw.decode()
    except UnicodeDecodeError:
        return False
    return True


# --- values of each kind, valid and not -------------------------------------------------------------


def valid_id(c: Chooser) -> str:
    return c.pick("abcxyz019") + c.text(0, 30, ID_ALPHABET)


def invalid_id_text(c: Chooser) -> str:
    return c.either(
        lambda: "",
        lambda: c.until(lambda: c.text(1, 12), lambda s: not ID_PATTERN.fullmatch(s)),
        lambda: c.pick("._:@- /#é\u00a0") + valid_id(c),  # must start with a letter or digit
        lambda: "a" * 129 + c.text(0, 5, ID_ALPHABET),  # too long
        lambda: valid_id(c) + c.pick([" ", "/", "\\", '"', "#", "é", "\x00", "\u2028", "\U0001f600", "\n"]),
    )


def not_a_string(c: Chooser) -> Any:
    return c.pick([None, True, False, 0, 7, -1, [], {}, ["a"], {"a": 1}, Raw("1.5")])


def not_an_integer(c: Chooser) -> Any:
    """A number with a fraction or an exponent is refused even when whole (D20), as is any other type."""
    sign = c.pick(["", "-"])
    return c.either(
        lambda: Raw(f"{sign}{c.integer(0, 10**9)}{c.pick(['', '.0', '.5', '.000'])}"
                    f"{c.pick(['e3', 'E2', 'e+0', 'e-1', 'E-07', 'e18'])}"),  # fmt: skip
        lambda: Raw(f"{sign}{c.integer(0, 10**9)}{c.pick(['.0', '.5', '.999', '.0000001'])}"),
        lambda: Raw(sign + "9" + c.text(20, 400, string.digits)),  # digits far past 2^53
        lambda: str(c.integer(-(10**6), 10**6)),  # a number in a string
        lambda: c.pick([None, True, False, [], {}, [1], {"amount": 1}, "", "1"]),
    )


def out_of_range(c: Chooser, minimum: int, maximum: int) -> int:
    return c.either(
        lambda: minimum - 1,
        lambda: maximum + 1,
        lambda: c.integer(-(10**40), minimum - 1),
        lambda: c.integer(maximum + 1, 10**40),
        lambda: c.pick([n for n in (-(2**63), 2**63, 2**64, 2**53, -(2**53)) if not minimum <= n <= maximum]),
    )


def bad_integer(c: Chooser, minimum: int, maximum: int) -> Any:
    return not_an_integer(c) if c.boolean() else out_of_range(c, minimum, maximum)


def unknown_field_name(c: Chooser, known: Sequence[str]) -> str:
    return c.until(lambda: c.text(1, 20, string.ascii_letters + string.digits + "_-. é"), lambda n: n not in known)


# --- a valid command, then one mutation -----------------------------------------------------------


@dataclass
class Draft:
    """A command record being built: a valid one first, then mutated in place."""

    op: str
    fields: dict[str, Any]
    key: bytes | None
    headers: list[tuple[str, bytes | None]]
    correlated: bool = True
    value: bytes | None = None  # set by a mutation of the bytes; else the fields, encoded
    value_set: bool = False

    def record_value(self) -> bytes | None:
        return self.value if self.value_set else encode(self.fields)

    def set_value(self, value: bytes | None) -> None:
        self.value, self.value_set = value, True


def valid_draft(c: Chooser, world: World) -> Draft:
    op = c.pick(OPS)
    wallet = c.pick(world.wallets)
    hold = world.holds[wallet]
    fields: dict[str, Any] = {"v": 1, "op": op, "id": valid_id(c), "wallet": wallet}
    if op == "open" and c.boolean():
        fields["floor"] = c.integer(-SAFE_INTEGER_MAX, 0)
    if op in ("credit", "extend"):
        fields["amount"] = c.integer(1, SAFE_INTEGER_MAX)
    if op in ("charge", "reserve", "capture"):
        choice = c.pick(["amount", "usage", "neither"] if op == "capture" else ["amount", "usage"])
        if choice == "amount":
            fields["amount"] = c.integer(0 if op == "capture" else 1, SAFE_INTEGER_MAX)
        elif choice == "usage":
            fields["usage"] = {"model": c.pick(["gpt-x", "claude", "m" * 128, "modèle 7"]),
                               "input_tokens": c.integer(0, SAFE_INTEGER_MAX),
                               "output_tokens": c.integer(0, 10**6)}  # fmt: skip
    if op in ("reserve", "extend") and c.boolean():
        fields["ttl_ms"] = c.integer(1, TTL_MAX_MS)
    if op in ("extend", "capture", "release", "expire"):
        fields["hold"] = hold
    if op == "expire":
        fields["id"] = f"expire:{hold}"
    if c.one_in(4):
        fields["memo"] = c.until(lambda: c.text(0, 30), lambda s: "\x00" not in s)
    if c.boolean():  # the order of fields is no part of the contract
        items = list(fields.items())
        fields = dict(items[i] for i in _permutation(c, len(items)))
    headers: list[tuple[str, bytes | None]] = [("reply_to", world.reply_topic.encode())]
    if c.one_in(5):
        headers.append(("reply_partition", str(c.integer(0, world.reply_partitions - 1)).encode()))
    if c.one_in(10):  # headers the contract does not know are ignored
        headers.insert(c.integer(0, len(headers)),
                       (c.pick(["x-trace", "Reply_To", "reply-to", "traceparent", "auth-x"]), c.binary(0, 16)))  # fmt: skip
    return Draft(op, fields, wallet.encode(), headers)


def _permutation(c: Chooser, size: int) -> list[int]:
    order = list(range(size))
    for i in range(size - 1, 0, -1):
        j = c.integer(0, i)
        order[i], order[j] = order[j], order[i]
    return order


# Each mutation breaks a valid draft in place and returns the field the 422 must name.


def drop_required(c: Chooser, draft: Draft) -> str:
    required = ["v", "op", "id", "wallet"] + [name for name in ("hold",) if name in draft.fields]
    if draft.op in ("credit", "extend", "charge", "reserve"):
        required.append("amount")  # charge and reserve without amount or usage: `amount: required (or usage)`
    name = c.pick(required)
    if name == "amount":
        draft.fields.pop("amount", None)
        draft.fields.pop("usage", None)
    else:
        del draft.fields[name]
    return name


def bad_version(c: Chooser, draft: Draft) -> str:
    draft.fields["v"] = c.either(lambda: c.until(lambda: out_of_range(c, 1, 1), lambda n: n != 1),
                                 lambda: not_an_integer(c),
                                 lambda: c.pick([0, 2, Raw("1.0"), Raw("1e0"), Raw("1E0"), "1", True]))  # fmt: skip
    return "v"


def bad_op(c: Chooser, draft: Draft) -> str:
    draft.fields["op"] = c.either(
        lambda: c.until(lambda: c.text(0, 12), lambda s: s not in OPS),
        lambda: c.pick(["OPEN", "Charge", "delete", "debit", "transfer", " open", "open ", "open\x00", "ope"]),
        lambda: not_a_string(c),
    )
    return "op"


def bad_id(c: Chooser, draft: Draft) -> str:
    if draft.op == "expire":  # anything but expire:<hold>
        hold = draft.fields["hold"]
        draft.fields["id"] = c.either(lambda: invalid_id_text(c), lambda: not_a_string(c), lambda: hold,
                                      lambda: f"expire:{hold}x", lambda: f"expire:{valid_id(c)}-{hold}",
                                      lambda: f"Expire:{hold}", lambda: f"expire:{hold} ")  # fmt: skip
    else:  # the prefix expire: is the sweeper's (D24)
        draft.fields["id"] = c.either(lambda: invalid_id_text(c), lambda: not_a_string(c),
                                      lambda: f"expire:{valid_id(c)}")  # fmt: skip
    return "id"


def bad_wallet(c: Chooser, draft: Draft) -> str:
    draft.fields["wallet"] = c.either(lambda: invalid_id_text(c), lambda: not_a_string(c))
    return "wallet"


def bad_hold(c: Chooser, draft: Draft) -> str:
    # An expire keeps its id, expire:<the hold it had>: well-formed, and checked first.
    draft.fields["hold"] = c.either(lambda: invalid_id_text(c), lambda: not_a_string(c))
    return "hold"


def bad_integer_field(c: Chooser, draft: Draft) -> str:
    """A bad amount, floor or ttl_ms; on an op that does not take it, it is named all the same."""
    name = c.pick(["amount", "floor", "ttl_ms"])
    minimum, maximum = ((0 if draft.op == "capture" else 1), SAFE_INTEGER_MAX) if name == "amount" else INTEGER_BOUNDS[name]
    draft.fields[name] = bad_integer(c, minimum, maximum)
    if name == "amount":
        draft.fields.pop("usage", None)
    return name


def not_allowed(c: Chooser, draft: Draft) -> str:
    """A well-formed field the op does not take (D12: `<field>: not allowed for op <op>`)."""
    name = c.pick([name for name in ("amount", "usage", "floor", "hold", "ttl_ms") if name not in OP_FIELDS[draft.op]])
    draft.fields[name] = {"amount": 5, "usage": {"model": "m", "input_tokens": 1, "output_tokens": 1},
                          "floor": -5, "hold": "h-1", "ttl_ms": 1000}[name]  # fmt: skip
    return name


def unknown_field(c: Chooser, draft: Draft) -> str:
    name = unknown_field_name(c, KNOWN_FIELDS)
    draft.fields[name] = c.either(lambda: c.integer(-9, 9), lambda: c.text(0, 10), lambda: None)
    return name


def bad_usage(c: Chooser, draft: Draft) -> str:
    usage: dict[str, Any] = {"model": "m-1", "input_tokens": 10, "output_tokens": 0}
    kind = c.pick(["type", "unknown", "model", "input_tokens", "output_tokens", "missing", "both"])
    named = "usage"
    if kind == "type":
        draft.fields["usage"] = c.either(lambda: c.pick([None, True, 0, 1, [], ["model"], Raw("1.5")]),
                                         lambda: c.text(0, 5))  # fmt: skip
    else:
        if kind == "unknown":
            name = unknown_field_name(c, USAGE_FIELDS)
            usage[name] = 1
            named = f"usage.{name}"
        elif kind == "model":
            usage["model"] = c.either(
                lambda: not_a_string(c), lambda: "", lambda: "m" * 129 + c.text(0, 20),
                lambda: c.text(0, 8, "abc-. ") + c.pick(["\x00", "\n", "\t", "\u2028", "\x7f", "\u200b"]),
            )  # fmt: skip
            named = "usage.model"
        elif kind in ("input_tokens", "output_tokens"):
            usage[kind] = bad_integer(c, *INTEGER_BOUNDS[kind])
            named = f"usage.{kind}"
        elif kind == "missing":
            missing = c.pick(USAGE_FIELDS)
            del usage[missing]
            named = f"usage.{missing}"
        draft.fields["usage"] = usage
    if draft.op not in ("charge", "reserve", "capture"):
        return "usage"  # not allowed for the op, whatever it holds
    if kind == "both":  # exactly one of amount and usage
        draft.fields["amount"] = 5
    else:
        draft.fields.pop("amount", None)
    return named


def bad_memo(c: Chooser, draft: Draft) -> str:
    draft.fields["memo"] = c.either(
        lambda: not_a_string(c),
        lambda: c.text(257, 400),  # 256 characters at most (code points, not bytes)
        lambda: "é" * 257,
        # Not storable text: PostgreSQL's text holds no NUL, and a lone surrogate is no Unicode text.
        lambda: c.text(0, 20) + c.pick(["\x00", "\ud800", "\udfff", "\udc80"]) + c.text(0, 20),
    )
    return "memo"


def bad_key(c: Chooser, draft: Draft) -> str:
    wallet = draft.fields["wallet"]
    draft.key = c.either(
        lambda: None, lambda: b"", lambda: wallet.upper().encode(), lambda: (wallet + " ").encode(),
        lambda: wallet.encode() + b"\xff", lambda: b"\xc3" + wallet.encode(), lambda: f"{valid_id(c)}-other".encode(),
        lambda: wallet.encode() + b"\x00",
    )  # fmt: skip
    return "key"


def broken_value(c: Chooser, draft: Draft) -> str:
    """Bytes that are no JSON object a contract reader accepts: every one is `value: …`."""
    text = json_text(draft.fields)
    raw = text.encode()
    kind = c.pick(["truncated", "trailing", "not_object", "not_utf8", "oversize", "empty", "missing", "nan",
                   "duplicate", "deep", "bom", "single_quotes"])  # fmt: skip
    if kind == "truncated":  # compact JSON: no strict prefix of an object is JSON
        draft.set_value(raw[: c.integer(1, len(raw) - 1)])
    elif kind == "trailing":
        draft.set_value((text + c.pick(["x", "}", ",", "{}", "[", "0", "\x00", "/* */", '"'])).encode())
    elif kind == "not_object":
        draft.set_value(encode(c.pick([[], [1], "text", 7, None, True, [draft.fields], -0.5])))
    elif kind == "not_utf8":
        at = c.integer(0, len(raw))
        draft.set_value(raw[:at] + c.pick([b"\xff", b"\xfe", b"\xc0\xaf", b"\xed\xa0\x80", b"\x80", b"\xf8\x88"]) + raw[at:])
    elif kind == "oversize":
        padding = VALUE_SIZE_MAX_BYTES + 1 - len(raw) + c.integer(0, 2_000)
        draft.set_value(c.pick([text + " " * padding, text[:-1] + ',"memo":"' + "x" * padding + '"}']).encode())
    elif kind == "empty":
        draft.set_value(c.pick([b"", b" ", b"\n", b"null", b"{", b"}"]))
    elif kind == "missing":  # a record with no value at all (a tombstone)
        draft.set_value(None)
    elif kind == "nan":
        draft.fields[c.pick(["v", "amount", "floor", "ttl_ms"])] = Raw(c.pick(["NaN", "Infinity", "-Infinity"]))
        draft.set_value(encode(draft.fields))
    elif kind == "duplicate":
        items = list(draft.fields.items())
        if c.boolean():
            name = c.pick([name for name, _ in items])
            items.insert(c.integer(0, len(items)), (name, draft.fields[name]))
        else:  # a key no field has, long or unprintable: the message that quotes it stays short (D3)
            name = c.either(lambda: "k" * c.integer(1, 5_000), lambda: c.text(1, 300))
            items[c.integer(0, len(items)):0] = [(name, 1), (name, 2)]
        draft.set_value(encode(Pairs(items)))
    elif kind == "deep":
        depth = c.integer(3_000, 8_000)  # past any parser's nesting limit, within 16 KiB
        draft.set_value((text[:-1] + ',"memo":' + "[" * depth + "]" * depth + "}").encode())
    elif kind == "bom":
        draft.set_value(b"\xef\xbb\xbf" + raw)
    elif kind == "single_quotes":
        draft.set_value(text.replace('"', "'").encode())
    return "value"


# The mutations of the body and the key: their 422 goes wherever the headers say.
BODY_MUTATIONS: dict[str, Callable[[Chooser, Draft], str]] = {
    "drop_required": drop_required, "bad_version": bad_version, "bad_op": bad_op, "bad_id": bad_id,
    "bad_wallet": bad_wallet, "bad_hold": bad_hold, "bad_integer": bad_integer_field, "not_allowed": not_allowed,
    "unknown_field": unknown_field, "bad_usage": bad_usage, "bad_memo": bad_memo, "bad_key": bad_key,
    "broken_value": broken_value,
}  # fmt: skip
# Where the answer goes: most records have a good reply address; the rest break it or redirect it.
ADDRESSES = ("reply",) * 12 + ("bad_reply_partition", "no_reply_to", "repeated_header", "bad_reply_to",
                               "ledger_topic", "bad_correlation_id", "missing_topic", "partition_beyond")  # fmt: skip


def broken_record(c: Chooser, world: World) -> Case:
    """A valid command of some op, broken by one mutation (and perhaps a broken address besides)."""
    draft = valid_draft(c, world)
    address = c.pick(ADDRESSES)
    outcome = Outcome.REPLY
    if address == "bad_reply_partition":
        mutation, field_name = address, bad_reply_partition(c, draft)  # the body stays valid
    elif address in ("repeated_header", "bad_reply_to", "ledger_topic", "bad_correlation_id"):
        # An unusable reply address is a 422 of its own, dead-lettered whatever the value says (D16).
        mutation, field_name, outcome = address, break_address(c, draft, address, world), Outcome.DEAD_LETTER
        draft.correlated = False
        if c.boolean():
            mutation += "+" + break_body(c, draft)[0]  # the reason names the address all the same
    else:
        mutation, field_name = break_body(c, draft)
        if address == "no_reply_to":  # a 422 with nobody to answer: dead-lettered
            draft.headers = [h for h in draft.headers if h[0] not in ("reply_to", "reply_partition")]
            draft.correlated = c.boolean()
            outcome = Outcome.DEAD_LETTER
        elif address == "missing_topic":  # the reply cannot be delivered: it goes to the dlq instead
            draft.headers = [("reply_to", c.pick(world.missing_topics).encode())]
            outcome = Outcome.REPLY_DEAD_LETTER
        elif address == "partition_beyond":  # well-formed, past the topic's partitions: placed by key
            draft.headers = [h for h in draft.headers if h[0] != "reply_partition"]
            partition = c.integer(world.reply_partitions, 10**9 - 1)
            draft.headers.append(("reply_partition", c.pick([str(partition), f"{partition:09d}"]).encode()))
        if address != "reply":
            mutation = f"{address}+{mutation}"
    return Case(mutation, draft.key, draft.record_value(), tuple(draft.headers), draft.correlated,
                Expect(outcome, field_name))  # fmt: skip


def break_body(c: Chooser, draft: Draft) -> tuple[str, str]:
    name = c.pick(list(BODY_MUTATIONS))
    return name, BODY_MUTATIONS[name](c, draft)


def bad_reply_partition(c: Chooser, draft: Draft) -> str:
    """A reply_partition that is no ASCII decimal: a 422 replied to reply_to by key (D11)."""
    draft.headers = [h for h in draft.headers if h[0] != "reply_partition"]
    value = c.either(
        lambda: c.pick([b"", b"-1", b"+1", b" 1", b"1 ", b"1.0", b"0x1", b"1e2", b"\xd9\xa1", b"\xff", b"\xef\xbc\x91",
                        b"1234567890", b"99999999999999999999", None]),
        lambda: c.until(lambda: c.binary(1, 8), lambda b: not (b.isdigit() and len(b) <= 9)),
    )  # fmt: skip
    draft.headers.insert(c.integer(0, len(draft.headers)), ("reply_partition", value))
    return "reply_partition"


def break_address(c: Chooser, draft: Draft, how: str, world: World) -> str:
    headers = draft.headers
    if how == "repeated_header":
        name = c.pick(["reply_to", "correlation_id", "reply_partition"])
        first = dict(headers).get(name) or {"reply_to": b"x", "correlation_id": b"c-1", "reply_partition": b"0"}[name]
        headers[:] = [h for h in headers if h[0] != name]
        second = c.pick([first, b"other", b"1", b""])
        headers.insert(c.integer(0, len(headers)), (name, first))
        headers.insert(c.integer(0, len(headers)), (name, second))
        return name
    if how == "bad_correlation_id":
        headers.insert(c.integer(0, len(headers)), ("correlation_id", c.either(
            lambda: c.until(lambda: c.binary(1, 40), lambda b: not is_utf8(b)),
            lambda: c.until(lambda: c.text(200, 300).encode(), lambda b: len(b) > 255),
            lambda: b"c" * 256, lambda: "é".encode() * 128,
        )))  # fmt: skip
        return "correlation_id"
    if how == "ledger_topic":  # a worker never writes replies into the log or the audit stream
        topic = c.pick(world.ledger_topics).encode()
    else:
        topic = c.either(
            lambda: c.pick([b"", b".", b"..", b"a b", b"topic/1", b"t\xc3\xa9", b"\xff\xfe", b"a" * 250,
                            b"replies\x00", b"*", None]),
            lambda: c.until(lambda: c.text(1, 20, TOPIC_ALPHABET + " /#*é:"), lambda t: not TOPIC_PATTERN.fullmatch(t)).encode(),
            lambda: c.until(lambda: c.binary(1, 20), lambda b: not is_utf8(b)),
        )  # fmt: skip
    headers[:] = [h for h in headers if h[0] != "reply_to"]
    headers.insert(c.integer(0, len(headers)), ("reply_to", topic))
    return "reply_to"


# --- garbage --------------------------------------------------------------------------------------


def json_value(c: Chooser, depth: int = 0) -> Any:
    """Random JSON, its object keys mostly the contract's own names to reach past the first checks."""
    kinds = ["null", "bool", "int", "float", "text"] + (["list", "object", "object"] if depth < 3 else [])
    kind = c.pick(kinds)
    if kind == "null":
        return None
    if kind == "bool":
        return c.boolean()
    if kind == "int":
        return c.integer(-(2**64), 2**64)
    if kind == "float":
        return Raw(f"{c.integer(-999, 999)}.{c.integer(0, 999)}e{c.integer(-30, 30)}")
    if kind == "text":
        return c.either(lambda: c.text(0, 12), lambda: c.pick(OPS), lambda: valid_id(c))
    if kind == "list":
        return [json_value(c, depth + 1) for _ in range(c.integer(0, 4))]
    names = [c.either(lambda: c.pick(KNOWN_FIELDS + USAGE_FIELDS), lambda: c.text(0, 8)) for _ in range(c.integer(0, 7))]
    return Pairs([(name, json_value(c, depth + 1)) for name in names])


def garbage_record(c: Chooser, world: World) -> Case:
    """Random bytes or random JSON under a good reply address: a 422 naming some field, no more."""
    value = c.either(lambda: c.binary(0, 200), lambda: encode(json_value(c)))
    # Never a key a wallet could equal, so that no garbage can ever be a valid command.
    key = c.either(lambda: None, lambda: b"\xff" + c.binary(0, 12))
    return Case("garbage", key, value, (("reply_to", world.reply_topic.encode()),), True, Expect(Outcome.REPLY, None))


def fuzz_record(c: Chooser, world: World) -> Case:
    return garbage_record(c, world) if c.one_in(10) else broken_record(c, world)
