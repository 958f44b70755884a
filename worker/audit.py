"""The auditor: checks the database and the events topic against each other and the invariants.

It trusts neither the worker nor the stream: every wallet's floor, balance (the sum of its accepted
money moves), reserved (the sum of its open holds) and seq (1 to n, no gaps) in the database; then
every event on the stream against its stored decision, and every stored decision against the
stream (an event missing from it is a gap).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from worker.adapter.streams import read_to_end
from worker.config import KafkaCredentials
from worker.store import books
from worker.store.books import Violation

VIOLATIONS_SHOWN_MAX = 20
PROGRESS_EVERY_S = 2.0


@dataclass
class Report:
    wallets: int = 0
    decisions: int = 0
    events: int = 0
    violations: list[Violation] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations


async def audit(database_url: str, bootstrap: str, commands_topic: str, events_topic: str,
                progress: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
                credentials: KafkaCredentials | None = None) -> Report:  # fmt: skip
    connection = await books.connect(database_url)
    try:
        report = Report(**{k: v for k, v in (await books.counts(connection)).items() if k in ("wallets", "decisions")})
        progress(f"audit: {report.wallets:,} wallets, {report.decisions:,} decisions in the database")
        report.violations += await books.database_violations(connection, commands_topic)
        expected = await books.wallet_seqs(connection)
        seen: dict[str, set[int]] = {}
        started, last_shown = time.monotonic(), [0.0]

        async def check(records: Sequence) -> None:
            events = [json.loads(record.value) for record in records]
            report.events += len(events)
            keys = [(e.get("wallet"), e.get("seq")) for e in events]
            stored = await books.stored_replies(connection, [k for k in keys if isinstance(k[1], int)])
            for key, event in zip(keys, events, strict=True):
                seen.setdefault(key[0], set()).add(key[1])
                if stored.get(key) != {**event, "duplicate": False}:
                    report.violations.append(Violation("event", key[0], f"seq {key[1]} differs from its stored decision"))
            if time.monotonic() - last_shown[0] > PROGRESS_EVERY_S:
                last_shown[0] = time.monotonic()
                rate = report.events / max(last_shown[0] - started, 1e-9)
                progress(f"audit: {report.events:,} events checked ({rate:,.0f}/s)")

        await read_to_end(bootstrap, events_topic, check, credentials=credentials)
        for wallet, seq in sorted(expected.items()):
            missing = sorted(set(range(1, seq + 1)) - seen.get(wallet, set()))
            if missing:
                report.violations.append(Violation("events", wallet, f"no event for seq {_ranges(missing)}"))
        for wallet in sorted(set(seen) - set(expected)):
            report.violations.append(Violation("events", wallet, "events for a wallet the database lacks"))
        return report
    finally:
        await connection.close()


def _ranges(numbers: list[int]) -> str:
    shown = ", ".join(str(n) for n in numbers[:10])
    return shown + (f" and {len(numbers) - 10} more" if len(numbers) > 10 else "")
