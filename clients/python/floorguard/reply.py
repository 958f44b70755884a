"""The reply to a command, as the contract defines it (see docs/contract.md)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt


class Reply(BaseModel):
    model_config = ConfigDict(frozen=True, extra="allow")

    v: StrictInt
    id: str | None
    wallet: str | None
    op: str | None
    ok: StrictBool
    status: StrictInt
    error: str | None = None
    message: str | None = None
    amount: StrictInt | None = None
    balance: StrictInt | None = None
    reserved: StrictInt | None = None
    available: StrictInt | None = None
    hold: str | None = None
    expires_at: str | None = None
    seq: StrictInt | None = None
    at: str
    duplicate: StrictBool = False
