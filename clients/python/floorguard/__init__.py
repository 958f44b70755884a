"""floorguard's client for agents: `from floorguard import Ledger`."""

from floorguard.errors import (
    BalanceOverflow,
    ExceedsHold,
    Forbidden,
    HoldClosed,
    HoldExpired,
    HoldNotExpired,
    HoldNotFound,
    IdempotencyConflict,
    InsufficientFunds,
    InvalidCommand,
    LedgerError,
    Refused,
    ReplyTimeout,
    Unauthenticated,
    UnknownModel,
    WalletExists,
    WalletNotFound,
)
from floorguard.ledger import HeldCall, Ledger
from floorguard.reply import Reply
from floorguard.usage import Usage, usage_from

__all__ = [
    "BalanceOverflow", "ExceedsHold", "Forbidden", "HoldClosed", "HoldExpired", "HoldNotExpired",
    "HeldCall", "HoldNotFound", "IdempotencyConflict", "InsufficientFunds", "InvalidCommand", "Ledger",
    "LedgerError", "Refused", "Reply", "ReplyTimeout", "Unauthenticated", "UnknownModel",
    "Usage", "WalletExists", "WalletNotFound", "usage_from",
]  # fmt: skip
