"""The hold sweeper: a dead-man's switch that writes `expire` for every hold past its expiry.

Each worker sweeps the partitions it owns. It never decides anything: it only writes an `expire`
command (id `expire:<hold>`) to the commands topic, so that the release is in the log, replays,
and is decided like any other command, on the record's broker timestamp. An `expire` that comes
too early is refused unstored (409 hold_not_expired) and simply sent again later.

When is "past its expiry"? The sweeper never reads the wall clock: it estimates the broker's clock
from the broker timestamps it has seen (commands it consumed, expires it wrote) plus the time
elapsed since on this host's monotonic clock. A worker whose wall clock is wrong by minutes
sweeps at the same moments.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from worker.core.model import Hold
from worker.store.store import TRANSIENT_ERRORS, Store

RESEND_AFTER_S = 5.0  # an expire not yet decided is written again after this long
SWEEP_BATCH_MAX = 1_000  # expires written per sweep
SENT_MEMORY_MAX = 100_000  # holds remembered as recently sent

log = logging.getLogger("floorguard.sweeper")


class SendFailed(Exception):
    """The broker did not take the expires (it is away, or slow): they are written again next sweep."""


class BrokerClock:
    """The broker's time as last seen, carried forward on the monotonic clock."""

    def __init__(self, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._monotonic = monotonic
        self._seen_ms: int | None = None
        self._seen_at_s = 0.0

    def observe(self, broker_ms: int) -> None:
        if self._seen_ms is None or broker_ms > self.now_ms():
            self._seen_ms = broker_ms
            self._seen_at_s = self._monotonic()

    def now_ms(self) -> int | None:
        if self._seen_ms is None:
            return None
        return self._seen_ms + int((self._monotonic() - self._seen_at_s) * 1000)


SendExpires = Callable[[Sequence[Hold]], Awaitable[int | None]]  # returns a broker timestamp seen


class Sweeper:
    def __init__(self, store: Callable[[], Store], send: SendExpires, owned: Callable[[], Sequence[int]],
                 clock: BrokerClock, interval_ms: int) -> None:  # fmt: skip
        assert interval_ms > 0
        self._interval_s = interval_ms / 1000
        self._store_of = store
        self._send = send
        self._owned = owned
        self._clock = clock
        self._sent_at: dict[tuple[str, str], float] = {}

    async def run(self) -> None:
        while True:
            try:
                await self.sweep()
            except (*TRANSIENT_ERRORS, asyncio.TimeoutError, SendFailed) as error:
                log.warning("sweep failed, trying again: %r", error)
            await asyncio.sleep(self._interval_s)

    async def sweep(self) -> int:
        """Write the expires that are due; return how many were written."""
        partitions = list(self._owned())
        if not partitions:
            return 0
        store = self._store_of()
        now_ms = self._clock.now_ms()
        if now_ms is None:
            # Never saw the broker's clock: write the soonest expire anyway. If early, it is
            # refused unstored; either way its record's timestamp tells the broker's time.
            earliest = await store.earliest_open_hold(partitions)
            due = [earliest] if earliest is not None else []
        else:
            due = await store.expired_holds(partitions, now_ms, SWEEP_BATCH_MAX)
        fresh = self._not_recently_sent(due)
        if not fresh:
            return 0
        broker_ms = await self._send(fresh)
        if broker_ms is not None:
            self._clock.observe(broker_ms)
        return len(fresh)

    def _not_recently_sent(self, holds: Sequence[Hold]) -> list[Hold]:
        now_s = time.monotonic()
        if len(self._sent_at) > SENT_MEMORY_MAX:
            self._sent_at = {k: t for k, t in self._sent_at.items() if now_s - t < RESEND_AFTER_S}
        fresh = []
        for hold in holds:
            key = (hold.wallet, hold.hold)
            if now_s - self._sent_at.get(key, -RESEND_AFTER_S) >= RESEND_AFTER_S:
                self._sent_at[key] = now_s
                fresh.append(hold)
        return fresh


def expire_command(hold: Hold) -> dict[str, object]:
    return {"v": 1, "op": "expire", "id": f"expire:{hold.hold}", "wallet": hold.wallet, "hold": hold.hold}
