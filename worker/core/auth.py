"""Who may do what: HMAC-signed commands and the scope of each key (the contract's Security section).

A command carries `auth: <key_id>.<signature>`, the lowercase hex HMAC-SHA256 of the record's value
bytes under the key's secret. No secret is stored anywhere: a key's secret is derived from the
operators' master secret and the key's id (`derive_secret`), so the ledger keeps only each key's
scope and the times it was valid. Those times are broker time, compared with the command's time,
so that a replay decides exactly as the live worker did.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache

from worker.core.codes import Op
from worker.core.model import Command, Parsed, Record

AUTH_HEADER = "auth"
SIGNATURE_HEX_CHARS = 64
KEY_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
SECRET_PREFIX = "fgs_"
MASTER_SECRET_LENGTH_MIN_CHARS = 32
SWEEPER_KEY_ID = "floorguard-sweeper"
SECRETS_CACHED_MAX = 65_536
# Domain separation: a derived secret can never equal the master check, nor either a signature.
_SECRET_DOMAIN = b"floorguard key secret v1\x00"
_CHECK_DOMAIN = b"floorguard master check v1\x00"

SPEND_OPS = frozenset({Op.CHARGE, Op.RESERVE, Op.EXTEND, Op.CAPTURE, Op.RELEASE})


class Scope(StrEnum):
    WALLET = "wallet"  # spends from one wallet: SPEND_OPS on that wallet only
    ADMIN = "admin"  # every op on every wallet, open and credit included
    EXPIRE = "expire"  # the workers' sweeper: expire alone


@dataclass(frozen=True, slots=True)
class Key:
    key_id: str
    scope: Scope
    wallet: str | None
    valid_from_ms: int
    revoked_at_ms: int | None

    def valid_at(self, at_ms: int) -> bool:
        return self.valid_from_ms <= at_ms and (self.revoked_at_ms is None or at_ms < self.revoked_at_ms)


@dataclass(frozen=True, slots=True)
class Authority:
    """What the core needs to authenticate a partition's batch.

    `modes` lists (valid_from_ms, required) in time order: authentication applies to a command
    when the latest entry at or before its time says required. `keys` holds the keys the batch
    names (a name missing here is unknown). `secret_of` derives a key's secret; it closes over the
    master secret so that the master never sits in a data structure that could be printed.
    """

    modes: Sequence[tuple[int, bool]]
    keys: Mapping[str, Key]
    secret_of: Callable[[str], bytes] | None

    def required_at(self, at_ms: int) -> bool:
        required = False
        for valid_from_ms, mode_required in self.modes:
            if valid_from_ms > at_ms:
                break
            required = mode_required
        return required


@dataclass(frozen=True, slots=True)
class Credentials:
    key_id: str
    signature: str


def credentials(record: Record) -> Credentials | str:
    """The record's `auth` header, or what is wrong with it."""
    found = [value for name, value in record.headers if name == AUTH_HEADER]
    if not found:
        return "missing"
    if len(found) > 1:
        return "header repeated"
    try:
        text = found[0].decode("ascii")
    except UnicodeDecodeError:
        return "not ASCII"
    key_id, dot, signature = text.rpartition(".")
    if not dot or not KEY_ID_PATTERN.fullmatch(key_id):
        return "must be <key_id>.<signature>"
    if len(signature) != SIGNATURE_HEX_CHARS or signature.strip("0123456789abcdef"):
        return "signature must be 64 lowercase hex digits"
    return Credentials(key_id, signature)


def authenticate(authority: Authority, parsed: Parsed, at_ms: int) -> Key | str:
    """The key that signed the record, or why it is refused (401)."""
    found = parsed.credentials
    if isinstance(found, str):
        return f"auth: {found}"
    key = authority.keys.get(found.key_id)
    if key is None:
        return "auth: unknown key"
    if not key.valid_at(at_ms):
        return "auth: key revoked" if key.revoked_at_ms is not None and at_ms >= key.revoked_at_ms else "auth: key not valid yet"
    assert authority.secret_of is not None, "authentication required without a master secret"
    expected = signature(authority.secret_of(key.key_id), parsed.record.value or b"")
    if not hmac.compare_digest(expected, found.signature):
        return "auth: signature does not match the value"
    return key


def authorize(key: Key, command: Command) -> str | None:
    """Why the key may not do the command (403), or None when it may."""
    match key.scope:
        case Scope.ADMIN:
            return None
        case Scope.EXPIRE:
            return None if command.op is Op.EXPIRE else f"this key may only expire holds, not {command.op.value}"
        case Scope.WALLET:
            if command.op not in SPEND_OPS:
                return f"a spend key may not {command.op.value}"
            if command.wallet != key.wallet:
                return "a spend key may only spend from its own wallet"
            return None


# --- secrets ------------------------------------------------------------------------------------


def derive_secret(master: bytes, key_id: str) -> str:
    """A key's secret as handed to its holder: the HMAC key is this string's ASCII bytes."""
    return SECRET_PREFIX + hmac.new(master, _SECRET_DOMAIN + key_id.encode(), hashlib.sha256).hexdigest()


def master_check(master: bytes) -> str:
    """Stored by the ledger, so that a worker started with another master secret refuses to run."""
    return hmac.new(master, _CHECK_DOMAIN, hashlib.sha256).hexdigest()[:32]


def secret_deriver(master: bytes) -> Callable[[str], bytes]:
    @lru_cache(maxsize=SECRETS_CACHED_MAX)
    def secret_of(key_id: str) -> bytes:
        return derive_secret(master, key_id).encode()

    return secret_of


def signature(secret: bytes, value: bytes) -> str:
    return hmac.new(secret, value, hashlib.sha256).hexdigest()


def auth_header(key_id: str, secret: str, value: bytes) -> tuple[str, bytes]:
    """The header that signs `value`: what every client sends."""
    return AUTH_HEADER, f"{key_id}.{signature(secret.encode(), value)}".encode()
