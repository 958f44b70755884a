"""The decision rules: a partition's batch in, one decision per record out, state updated in place.

The order of checks is the contract's order of precedence, so the first refusal that applies is
the one given. Every accepted effect keeps `balance - reserved >= floor`; `_assert_invariant`
checks it once more before a new state leaves the core.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import replace
from typing import Any, assert_never

from worker.core.codes import SAFE_INTEGER_MAX, STATUS_OK, ErrorCode, Op
from worker.core.model import (
    Command,
    Decision,
    Invalid,
    Parsed,
    PartitionState,
    Reply,
    StoredDecision,
    Wallet,
)

CONTRACT_VERSION = 1


def decide_batch(state: PartitionState, batch: Iterable[Parsed]) -> list[Decision]:
    """Decide the records of one partition in offset order, updating `state` as each is decided."""
    decisions = []
    for parsed in batch:
        # Time never runs backwards within a partition: the largest broker timestamp seen so far.
        state.clock_ms = max(state.clock_ms, parsed.record.timestamp_ms)
        decision = decide(state, parsed, state.clock_ms)
        if decision.stored:
            assert decision.wallet is not None and decision.fingerprint is not None
            state.wallets[decision.wallet.wallet] = decision.wallet
            key = (decision.wallet.wallet, decision.reply["id"])
            state.decisions[key] = StoredDecision(decision.fingerprint, decision.reply)
        decisions.append(decision)
    return decisions


def decide(state: PartitionState, parsed: Parsed, at_ms: int) -> Decision:
    command = parsed.command
    if isinstance(command, Invalid):
        reply = _reply_base(command.id, command.wallet, command.op, at_ms)
        return Decision(parsed, _refused(reply, command.error, command.message), stored=False)

    wallet = state.wallets.get(command.wallet)
    reply = _reply_base(command.id, command.wallet, command.op.value, at_ms)
    if wallet is None and command.op is not Op.OPEN:
        return Decision(parsed, _refused(reply, ErrorCode.WALLET_NOT_FOUND, "no such wallet"), stored=False)

    fingerprint = command.fingerprint()
    prior = state.decisions.get((command.wallet, command.id))
    if prior is not None:
        if prior.fingerprint == fingerprint:
            return Decision(parsed, {**prior.reply, "duplicate": True}, stored=False)
        refusal = _refused(reply, ErrorCode.IDEMPOTENCY_CONFLICT, "this id already names another request")
        return Decision(parsed, _with_wallet(refusal, wallet), stored=False)

    if wallet is None:
        return _open(parsed, command, reply, state.partition, fingerprint, at_ms)
    return _apply(parsed, command, wallet, reply, fingerprint, at_ms)


def _open(
    parsed: Parsed, command: Command, reply: Reply, partition: int, fingerprint: str, at_ms: int
) -> Decision:
    floor = command.floor if command.floor is not None else 0
    wallet = Wallet(command.wallet, balance=0, reserved=0, floor=floor, seq=1, partition=partition)
    _assert_invariant(wallet)
    accepted = {**_with_wallet(reply, wallet), "ok": True, "status": STATUS_OK, "seq": 1}
    return Decision(parsed, accepted, True, wallet, fingerprint, command.memo, at_ms)


def _apply(
    parsed: Parsed, command: Command, wallet: Wallet, reply: Reply, fingerprint: str, at_ms: int
) -> Decision:
    """A stored decision on an existing wallet: accepted or refused, it takes the next seq."""
    outcome = _effect(command, wallet)
    seq = wallet.seq + 1
    if isinstance(outcome, ErrorCode):
        after = replace(wallet, seq=seq)
        refusal = {**_refused(_with_wallet(reply, after), outcome, _MESSAGES[outcome]), "seq": seq}
        return Decision(parsed, refusal, True, after, fingerprint, command.memo, at_ms)
    after = replace(outcome, seq=seq)
    _assert_invariant(after)
    accepted = {**_with_wallet(reply, after), "ok": True, "status": STATUS_OK, "seq": seq}
    accepted["amount"] = command.amount
    return Decision(parsed, accepted, True, after, fingerprint, command.memo, at_ms)


def _effect(command: Command, wallet: Wallet) -> Wallet | ErrorCode:
    """The wallet after the command, or the refusal. Checks in the contract's precedence."""
    match command.op:
        case Op.OPEN:
            return ErrorCode.WALLET_EXISTS
        case Op.CREDIT:
            assert command.amount is not None and command.amount >= 1
            balance = wallet.balance + command.amount
            if balance > SAFE_INTEGER_MAX or balance - wallet.reserved - wallet.floor > SAFE_INTEGER_MAX:
                return ErrorCode.BALANCE_OVERFLOW
            return replace(wallet, balance=balance)
        case Op.CHARGE:
            assert command.amount is not None and command.amount >= 1
            if command.amount > wallet.available:
                return ErrorCode.INSUFFICIENT_FUNDS
            return replace(wallet, balance=wallet.balance - command.amount)
        case Op.RESERVE | Op.EXTEND | Op.CAPTURE | Op.RELEASE | Op.EXPIRE:
            raise AssertionError(f"{command.op} passed the parser but is not decided yet")
        case _:
            assert_never(command.op)


_MESSAGES = {
    ErrorCode.WALLET_EXISTS: "the wallet already exists",
    ErrorCode.INSUFFICIENT_FUNDS: "the amount exceeds what is available",
    ErrorCode.BALANCE_OVERFLOW: f"the balance or available would pass {SAFE_INTEGER_MAX}",
}


def _assert_invariant(wallet: Wallet) -> None:
    """A bug, not a refusal: the process stops rather than write a state past the floor."""
    assert wallet.balance - wallet.reserved >= wallet.floor, wallet
    assert wallet.reserved >= 0 and wallet.floor <= 0, wallet
    assert abs(wallet.balance) <= SAFE_INTEGER_MAX and wallet.available <= SAFE_INTEGER_MAX, wallet


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


def format_time(at_ms: int) -> str:
    """RFC 3339, UTC, milliseconds: `2026-11-23T10:00:00.123Z`."""
    seconds, milliseconds = divmod(at_ms, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{milliseconds:03d}Z"


def event(decision: Decision) -> dict[str, Any]:
    """The audit event of a stored decision: its reply plus where the command sits in the log."""
    assert decision.stored
    record = decision.parsed.record
    return {**decision.reply, "partition": record.partition, "offset": record.offset}
