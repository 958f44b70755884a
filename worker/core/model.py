"""The nouns the core decides over. Plain frozen dataclasses: no I/O, no framework."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from worker.core.codes import ErrorCode, Op

if TYPE_CHECKING:
    from worker.core.auth import Authority, Credentials

Reply = dict[str, Any]  # one reply object exactly as it goes on the wire (before JSON encoding)


@dataclass(frozen=True, slots=True)
class Record:
    """A command record as the broker delivered it. `timestamp_ms` is the broker's LogAppendTime."""

    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]


@dataclass(frozen=True, slots=True)
class ReplyAddress:
    topic: str
    correlation_id: str
    partition: int | None = None


TTL_DEFAULT_MS = 300_000


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens a model call used (or is estimated to use), priced by the price table."""

    model: str
    input_tokens: int
    output_tokens: int


@dataclass(frozen=True, slots=True)
class Command:
    """A well-formed command. Fields an op does not take are None."""

    op: Op
    id: str
    wallet: str
    amount: int | None = None
    usage: Usage | None = None
    floor: int | None = None
    hold: str | None = None
    ttl_ms: int | None = None
    memo: str | None = None

    def request(self) -> dict[str, Any]:
        """The request as idempotency compares it: every field but memo, defaults applied."""
        request: dict[str, Any] = {"v": 1, "op": self.op.value, "id": self.id, "wallet": self.wallet}
        if self.amount is not None:
            request["amount"] = self.amount
        if self.usage is not None:
            request["usage"] = {"model": self.usage.model, "input_tokens": self.usage.input_tokens,
                                "output_tokens": self.usage.output_tokens}  # fmt: skip
        if self.op is Op.OPEN:
            request["floor"] = self.floor if self.floor is not None else 0
        if self.hold is not None:
            request["hold"] = self.hold
        if self.op is Op.RESERVE:
            request["ttl_ms"] = self.ttl_ms if self.ttl_ms is not None else TTL_DEFAULT_MS
        elif self.ttl_ms is not None:  # extend: a given ttl_ms restarts the lifetime, none keeps it
            request["ttl_ms"] = self.ttl_ms
        return request

    def fingerprint(self) -> str:
        canonical = json.dumps(self.request(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Invalid:
    """A record the contract refuses with 422. `field` names what is wrong (D3 in docs/contract.md).

    `id`, `wallet` and `op` keep whatever of the record could be read and passed its own check,
    so that the reply can still name them.
    """

    field: str
    problem: str
    id: str | None = None
    wallet: str | None = None
    op: str | None = None
    error: ErrorCode = ErrorCode.INVALID_COMMAND

    @property
    def message(self) -> str:
        return f"{self.field}: {self.problem}"


@dataclass(frozen=True, slots=True)
class Parsed:
    """What `parse` makes of a record: a command or a 422, and where its reply goes.

    `dead_letter_reason` is set when the record is a 422 that has no usable reply address:
    it then goes to the dead-letter topic instead of being answered.
    """

    record: Record
    command: Command | Invalid
    reply_address: ReplyAddress | None
    dead_letter_reason: str | None = None
    credentials: Credentials | str = "missing"  # the `auth` header read, or what is wrong with it


@dataclass(frozen=True, slots=True)
class Wallet:
    wallet: str
    balance: int
    reserved: int
    floor: int
    seq: int
    partition: int

    @property
    def available(self) -> int:
        return self.balance - self.reserved - self.floor


@dataclass(frozen=True, slots=True)
class Hold:
    """Money set aside by a `reserve`, named by that command's id within its wallet."""

    wallet: str
    hold: str
    amount: int
    expires_at_ms: int
    open: bool
    partition: int


@dataclass(frozen=True, slots=True)
class Price:
    """One row of the price table: per million tokens, in the wallet's unit, from a time on."""

    model: str
    valid_from_ms: int
    input_price: int
    output_price: int


@dataclass(frozen=True, slots=True)
class StoredDecision:
    """What the idempotency check needs of a decision made earlier under the same (wallet, id)."""

    fingerprint: str
    reply: Reply


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one record.

    `stored` is true for a new decision with a seq: it is written, published as an event, and
    answers every later duplicate. `wallet` is the wallet's state after a stored decision.
    """

    parsed: Parsed
    reply: Reply
    stored: bool
    wallet: Wallet | None = None
    hold: Hold | None = None  # the hold's state after the decision, when it opened or changed one
    fingerprint: str | None = None
    memo: str | None = None
    at_ms: int = 0


@dataclass(slots=True)
class PartitionState:
    """What the core needs of a partition before deciding a batch of it.

    The shell loads it in the batch's transaction; `decide_batch` updates it in place as it goes,
    so that a later command of the batch sees the effect of an earlier one.
    """

    partition: int
    clock_ms: int
    wallets: dict[str, Wallet] = field(default_factory=dict)
    decisions: dict[tuple[str, str], StoredDecision] = field(default_factory=dict)
    holds: dict[tuple[str, str], Hold] = field(default_factory=dict)  # (wallet, hold)
    prices: dict[str, list[Price]] = field(default_factory=dict)  # model -> rows by valid_from_ms
    authority: Authority | None = None  # None: authentication has never been switched on
