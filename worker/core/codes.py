"""Result codes: declared once, stable, ordered by precedence, spelled the same on every layer."""

from __future__ import annotations

from enum import Enum, StrEnum

SAFE_INTEGER_MAX = 2**53 - 1  # every number on the wire stays exact in every JSON parser


class Op(StrEnum):
    OPEN = "open"
    CREDIT = "credit"
    CHARGE = "charge"
    RESERVE = "reserve"
    EXTEND = "extend"
    CAPTURE = "capture"
    RELEASE = "release"
    EXPIRE = "expire"



class ErrorCode(Enum):
    """Refusals in the contract's order of precedence: when several apply, the first wins.

    Each member is (wire code, HTTP-like status, stored). A stored refusal is a decision with a
    seq, published as an event and returned as a duplicate; an unstored one is decided afresh
    every time the same command comes again. Never renumber, reorder or reuse a member.
    """

    UNAUTHENTICATED = ("unauthenticated", 401, False)
    INVALID_COMMAND = ("invalid_command", 422, False)
    UNKNOWN_MODEL = ("unknown_model", 422, False)
    FORBIDDEN = ("forbidden", 403, False)
    WALLET_NOT_FOUND = ("wallet_not_found", 404, False)
    IDEMPOTENCY_CONFLICT = ("idempotency_conflict", 409, False)
    WALLET_EXISTS = ("wallet_exists", 409, True)
    HOLD_NOT_FOUND = ("hold_not_found", 404, True)
    HOLD_CLOSED = ("hold_closed", 409, True)
    HOLD_EXPIRED = ("hold_expired", 410, True)
    HOLD_NOT_EXPIRED = ("hold_not_expired", 409, False)
    EXCEEDS_HOLD = ("exceeds_hold", 409, True)
    INSUFFICIENT_FUNDS = ("insufficient_funds", 402, True)
    BALANCE_OVERFLOW = ("balance_overflow", 409, True)

    def __init__(self, code: str, status: int, stored: bool) -> None:
        self.code = code
        self.status = status
        self.stored = stored


STATUS_OK = 200
