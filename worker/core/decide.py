"""The decision rules: a partition's batch in, one decision per record out, state updated in place.

The order of checks is the contract's order of precedence, so the first refusal that applies is
the one given. Every accepted effect keeps `balance - reserved >= floor`; `_assert_invariant`
checks it once more before a new state leaves the core.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import Any, assert_never

from msgspec import Struct
from msgspec.structs import replace

from worker.core.auth import authenticate, authorize
from worker.core.codes import SAFE_INTEGER_MAX, STATUS_OK, ErrorCode, Op
from worker.core.model import (
    TTL_DEFAULT_MS,
    Command,
    Decision,
    Hold,
    Invalid,
    Parsed,
    PartitionState,
    Price,
    Reply,
    StoredDecision,
    Usage,
    Wallet,
)

CONTRACT_VERSION = 1
_OP_VALUE = {op: op.value for op in Op}  # a dict lookup: an Enum's `.value` is a Python property


PRICE_DIVISOR_TOKENS = 1_000_000  # prices are per million tokens


class Effect(Struct, frozen=True, gc=False):
    """An accepted command's result: the wallet after (its seq not yet moved), the hold after (if
    any), the amount."""

    wallet: Wallet
    hold: Hold | None
    amount: int
    expires_at_ms: int | None = None


def decide_batch(state: PartitionState, batch: Iterable[Parsed]) -> list[Decision]:
    """Decide the records of one partition in offset order, updating `state` as each is decided."""
    decisions = []
    wallets, stored_decisions, holds = state.wallets, state.decisions, state.holds
    clock_ms = state.clock_ms
    for parsed in batch:
        # Time never runs backwards within a partition: the largest broker timestamp seen so far.
        if parsed.record.timestamp_ms > clock_ms:
            clock_ms = state.clock_ms = parsed.record.timestamp_ms
        decision = decide(state, parsed, clock_ms)
        if decision.stored:
            wallet = decision.wallet
            assert wallet is not None and decision.fingerprint is not None
            wallets[wallet.wallet] = wallet
            stored_decisions[(wallet.wallet, decision.reply["id"])] = StoredDecision(decision.fingerprint, decision.reply)
            if decision.hold is not None:
                holds[(decision.hold.wallet, decision.hold.hold)] = decision.hold
        decisions.append(decision)
    return decisions


def decide(state: PartitionState, parsed: Parsed, at_ms: int) -> Decision:
    command = parsed.command
    key = None
    if state.authority is not None and state.authority.required_at(at_ms):
        key = authenticate(state.authority, parsed, at_ms)
        if isinstance(key, str):
            return _unauthorized(parsed, ErrorCode.UNAUTHENTICATED, key, at_ms)
    if isinstance(command, Invalid):
        reply = _reply_base(command.id, command.wallet, command.op, at_ms)
        return Decision(parsed, _refused(reply, command.error, command.message), stored=False)

    price = None
    if command.usage is not None:
        price = _price(state.prices.get(command.usage.model, ()), command.usage, at_ms)
        if price is None:
            message = f"usage.model: no price for {command.usage.model} in force at {format_time(at_ms)}"
            reply = _reply_base(command.id, command.wallet, command.op.value, at_ms)
            return Decision(parsed, _refused(reply, ErrorCode.UNKNOWN_MODEL, message), stored=False)
    if key is not None:
        problem = authorize(key, command)
        if problem is not None:
            return _unauthorized(parsed, ErrorCode.FORBIDDEN, problem, at_ms)

    wallet = state.wallets.get(command.wallet)
    if wallet is None and command.op is not Op.OPEN:
        reply = _reply_base(command.id, command.wallet, command.op.value, at_ms)
        return Decision(parsed, _refused(reply, ErrorCode.WALLET_NOT_FOUND, "no such wallet"), stored=False)

    fingerprint = command.fingerprint()
    prior = state.decisions.get((command.wallet, command.id))
    if prior is not None:
        if prior.fingerprint == fingerprint:
            return Decision(parsed, {**prior.reply, "duplicate": True}, stored=False)
        reply = _reply_base(command.id, command.wallet, command.op.value, at_ms)
        refusal = _refused(reply, ErrorCode.IDEMPOTENCY_CONFLICT, "this id already names another request")
        return Decision(parsed, _with_wallet(refusal, wallet), stored=False)

    if wallet is None:
        return _open(parsed, command, state.partition, fingerprint, at_ms)
    amount = price if price is not None else command.amount
    hold = state.holds.get((command.wallet, command.hold)) if command.hold is not None else None
    outcome = _effect(command, amount, wallet, hold, state.partition, at_ms)
    if outcome is ErrorCode.HOLD_NOT_EXPIRED:  # unstored, so that the sweeper may ask again
        reply = _reply_base(command.id, command.wallet, command.op.value, at_ms)
        refusal = _refused(_with_wallet(reply, wallet), outcome, _MESSAGES[outcome])
        return Decision(parsed, refusal, stored=False)
    return _stored(parsed, command, wallet, outcome, fingerprint, at_ms)


def _unauthorized(parsed: Parsed, error: ErrorCode, message: str, at_ms: int) -> Decision:
    """401 or 403: unstored, and never showing the wallet's state to whoever sent it. With no
    reply address it goes to the dead-letter topic, so that operators see every refused attempt."""
    command = parsed.command
    op = command.op if isinstance(command, Invalid) else command.op.value
    reply = _refused(_reply_base(command.id, command.wallet, op, at_ms), error, message)
    if parsed.reply_address is None:
        parsed = replace(parsed, dead_letter_reason=f"{error.code}: {message}")
    return Decision(parsed, reply, stored=False)


def _price(rows: Sequence[Price], usage: Usage, at_ms: int) -> int | None:
    """The cost of the usage under the row in force at `at_ms`, rounded up; None: no row."""
    in_force = [row for row in rows if row.valid_from_ms <= at_ms]
    if not in_force:
        return None
    row = max(in_force, key=lambda r: r.valid_from_ms)
    total = usage.input_tokens * row.input_price + usage.output_tokens * row.output_price
    return -(-total // PRICE_DIVISOR_TOKENS)


def _open(parsed: Parsed, command: Command, partition: int, fingerprint: str, at_ms: int) -> Decision:
    floor = command.floor if command.floor is not None else 0
    wallet = Wallet(command.wallet, balance=0, reserved=0, floor=floor, seq=1, partition=partition)
    _assert_invariant(wallet)
    accepted = _accepted(command, wallet, at_ms)
    return Decision(parsed, accepted, True, wallet, None, fingerprint, command.memo, at_ms)


def _stored(parsed: Parsed, command: Command, wallet: Wallet, outcome: Effect | ErrorCode, fingerprint: str,
            at_ms: int) -> Decision:  # fmt: skip
    """A stored decision on an existing wallet: accepted or refused, it takes the next seq."""
    seq = wallet.seq + 1
    if outcome.__class__ is ErrorCode:
        after = replace(wallet, seq=seq)
        balance, reserved = after.balance, after.reserved
        # A stored refusal (a runaway agent's 402s among them), made in one go: the fields of
        # `_refused(_with_wallet(_reply_base(…)))`, in the same order, and its seq.
        refusal = {"v": CONTRACT_VERSION, "id": command.id, "wallet": command.wallet, "op": _OP_VALUE[command.op],
                   "ok": False, "status": outcome.status, "error": outcome.code, "at": format_time(at_ms),
                   "duplicate": False, "balance": balance, "reserved": reserved,
                   "available": balance - reserved - after.floor, "message": _MESSAGES[outcome], "seq": seq}  # fmt: skip
        return Decision(parsed, refusal, True, after, None, fingerprint, command.memo, at_ms)
    moved = outcome.wallet
    after = Wallet(moved.wallet, moved.balance, moved.reserved, moved.floor, seq, moved.partition)
    _assert_invariant(after)
    accepted = _accepted(command, after, at_ms)
    accepted["amount"] = outcome.amount
    if outcome.expires_at_ms is not None:
        accepted["hold"] = command.id if command.op is Op.RESERVE else command.hold
        accepted["expires_at"] = format_time(outcome.expires_at_ms)
    return Decision(parsed, accepted, True, after, outcome.hold, fingerprint, command.memo, at_ms)


def _effect(command: Command, amount: int | None, wallet: Wallet, hold: Hold | None, partition: int,
            at_ms: int) -> Effect | ErrorCode:  # fmt: skip
    """The result of the command, or the refusal. Checks in the contract's precedence."""
    match command.op:
        case Op.OPEN:
            return ErrorCode.WALLET_EXISTS
        case Op.CREDIT:
            assert amount is not None and amount >= 1
            balance = wallet.balance + amount
            # balance − floor is what `available` becomes once every hold is released.
            if balance > SAFE_INTEGER_MAX or balance - wallet.floor > SAFE_INTEGER_MAX:
                return ErrorCode.BALANCE_OVERFLOW
            return Effect(replace(wallet, balance=balance), None, amount)
        case Op.CHARGE:
            assert amount is not None and amount >= 0
            balance = wallet.balance
            if amount > balance - wallet.reserved - wallet.floor:
                return ErrorCode.INSUFFICIENT_FUNDS
            return Effect(replace(wallet, balance=balance - amount), None, amount)
        case Op.RESERVE:
            assert amount is not None
            if amount > wallet.available:
                return ErrorCode.INSUFFICIENT_FUNDS
            if wallet.reserved + amount > SAFE_INTEGER_MAX:
                return ErrorCode.BALANCE_OVERFLOW
            expires_at_ms = at_ms + (command.ttl_ms if command.ttl_ms is not None else TTL_DEFAULT_MS)
            opened = Hold(command.wallet, command.id, amount, expires_at_ms, True, partition)
            return Effect(replace(wallet, reserved=wallet.reserved + amount), opened, amount, expires_at_ms)
        case Op.EXTEND | Op.CAPTURE | Op.RELEASE | Op.EXPIRE:
            return _hold_effect(command, amount, wallet, hold, at_ms)
        case _:
            assert_never(command.op)


def _hold_effect(command: Command, amount: int | None, wallet: Wallet, hold: Hold | None,
                 at_ms: int) -> Effect | ErrorCode:  # fmt: skip
    if hold is None:
        return ErrorCode.HOLD_NOT_FOUND
    if not hold.open:
        return ErrorCode.HOLD_CLOSED
    expired = at_ms >= hold.expires_at_ms
    closed = replace(hold, open=False)
    released = replace(wallet, reserved=wallet.reserved - hold.amount)
    match command.op:
        case Op.EXTEND:
            assert amount is not None and amount >= 1
            if expired:
                return ErrorCode.HOLD_EXPIRED
            if amount > wallet.available:
                return ErrorCode.INSUFFICIENT_FUNDS
            if hold.amount + amount > SAFE_INTEGER_MAX or wallet.reserved + amount > SAFE_INTEGER_MAX:
                return ErrorCode.BALANCE_OVERFLOW
            expires_at_ms = at_ms + command.ttl_ms if command.ttl_ms is not None else hold.expires_at_ms
            grown = replace(hold, amount=hold.amount + amount, expires_at_ms=expires_at_ms)
            return Effect(replace(wallet, reserved=wallet.reserved + amount), grown, amount, expires_at_ms)
        case Op.CAPTURE:
            if expired:
                return ErrorCode.HOLD_EXPIRED
            captured = hold.amount if amount is None else amount
            if captured > hold.amount:
                return ErrorCode.EXCEEDS_HOLD
            return Effect(replace(released, balance=wallet.balance - captured), closed, captured)
        case Op.RELEASE:
            return Effect(released, closed, hold.amount)
        case Op.EXPIRE:
            if not expired:
                return ErrorCode.HOLD_NOT_EXPIRED
            return Effect(released, closed, hold.amount)
        case _:
            raise AssertionError(f"{command.op} names no hold")


_MESSAGES = {
    ErrorCode.WALLET_EXISTS: "the wallet already exists",
    ErrorCode.HOLD_NOT_FOUND: "no such hold in this wallet",
    ErrorCode.HOLD_CLOSED: "the hold was already captured, released or expired",
    ErrorCode.HOLD_EXPIRED: "the hold expired",
    ErrorCode.HOLD_NOT_EXPIRED: "the hold has not expired yet",
    ErrorCode.EXCEEDS_HOLD: "the capture exceeds the hold",
    ErrorCode.INSUFFICIENT_FUNDS: "the amount exceeds what is available",
    ErrorCode.BALANCE_OVERFLOW: f"the balance, a hold or available would pass {SAFE_INTEGER_MAX}",
}


def _assert_invariant(wallet: Wallet) -> None:
    """A bug, not a refusal: the process stops rather than write a state past the floor."""
    balance, reserved, floor = wallet.balance, wallet.reserved, wallet.floor
    assert balance - reserved >= floor and reserved >= 0 and floor <= 0, wallet
    assert -SAFE_INTEGER_MAX <= balance <= SAFE_INTEGER_MAX and balance - reserved - floor <= SAFE_INTEGER_MAX, wallet


def _accepted(command: Command, after: Wallet, at_ms: int) -> Reply:
    """An accepted reply, made in one go (the same fields, in the same order, as a refusal's)."""
    balance, reserved = after.balance, after.reserved
    return {"v": CONTRACT_VERSION, "id": command.id, "wallet": command.wallet, "op": _OP_VALUE[command.op], "ok": True,
            "status": STATUS_OK, "error": None, "at": format_time(at_ms), "duplicate": False, "balance": balance,
            "reserved": reserved, "available": balance - reserved - after.floor, "seq": after.seq}  # fmt: skip


def _reply_base(command_id: str | None, wallet: str | None, op: str | None, at_ms: int) -> Reply:
    return {
        "v": CONTRACT_VERSION,
        "id": command_id,
        "wallet": wallet,
        "op": op,
        "ok": False,
        "status": 0,
        "error": None,
        "at": format_time(at_ms),
        "duplicate": False,
    }


def _refused(reply: Reply, error: ErrorCode, message: str) -> Reply:
    return {**reply, "ok": False, "status": error.status, "error": error.code, "message": message}


def _with_wallet(reply: Reply, wallet: Wallet | None) -> Reply:
    if wallet is None:
        return reply
    return {**reply, "balance": wallet.balance, "reserved": wallet.reserved, "available": wallet.available}


@lru_cache(maxsize=4096)  # the records of a produce batch share their broker timestamp
def format_time(at_ms: int) -> str:
    """RFC 3339, UTC, milliseconds: `2026-11-23T10:00:00.123Z`."""
    seconds, milliseconds = divmod(at_ms, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{milliseconds:03d}Z"


def event(decision: Decision) -> dict[str, Any]:
    """The audit event of a stored decision: its reply plus where the command sits in the log."""
    assert decision.stored
    record = decision.parsed.record
    return {**decision.reply, "partition": record.partition, "offset": record.offset}
