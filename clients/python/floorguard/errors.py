"""Typed refusals. A refusal is the ledger's answer, carried whole in `.reply`."""

from __future__ import annotations

from floorguard.reply import Reply


class LedgerError(Exception):
    """Anything the client cannot turn into a result."""


class ReplyTimeout(LedgerError):
    """No reply after every attempt. The command may still be decided: send it again with the
    same id to learn the outcome, never with a new one."""

    def __init__(self, command_id: str, attempts: int, timeout_s: float) -> None:
        super().__init__(f"no reply to command {command_id} after {attempts} attempts of {timeout_s} s")
        self.command_id = command_id


class Refused(LedgerError):
    code = ""
    # Whether the same request under a NEW id could succeed later (TigerBeetle's `transient`).
    transient = False

    def __init__(self, reply: Reply) -> None:
        super().__init__(f"{reply.status} {reply.error}: {reply.message or ''}".rstrip(": "))
        self.reply = reply

    @property
    def status(self) -> int:
        return self.reply.status


class InsufficientFunds(Refused):
    code = "insufficient_funds"
    transient = True  # after a credit, a new attempt may pass

    @property
    def available(self) -> int:
        assert self.reply.available is not None
        return self.reply.available


class Unauthenticated(Refused):
    code = "unauthenticated"


class Forbidden(Refused):
    code = "forbidden"


class InvalidCommand(Refused):
    code = "invalid_command"


class UnknownModel(Refused):
    code = "unknown_model"
    transient = True


class WalletNotFound(Refused):
    code = "wallet_not_found"
    transient = True


class IdempotencyConflict(Refused):
    code = "idempotency_conflict"


class WalletExists(Refused):
    code = "wallet_exists"


class HoldNotFound(Refused):
    code = "hold_not_found"


class HoldClosed(Refused):
    code = "hold_closed"


class HoldExpired(Refused):
    code = "hold_expired"


class HoldNotExpired(Refused):
    code = "hold_not_expired"
    transient = True


class ExceedsHold(Refused):
    code = "exceeds_hold"


class BalanceOverflow(Refused):
    code = "balance_overflow"


REFUSALS: dict[str, type[Refused]] = {cls.code: cls for cls in Refused.__subclasses__()}


def refusal(reply: Reply) -> Refused:
    return REFUSALS.get(reply.error or "", Refused)(reply)
