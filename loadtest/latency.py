"""Latency of a lone command: charges sent one at a time, each when the last one is answered.

    .venv/bin/python loadtest/latency.py --commands 500 --wallets 10

Sets up its own ledger as `load.py` does (a fresh database and topic prefix, one worker process),
opens and funds `--wallets` wallets, then sends `--commands` charges through the floorguard client
(`clients/python`, what an agent calls), round robin over the wallets, each waiting for its reply
(a closed loop of one: the ledger is otherwise idle). Each charge is timed from the call to its
reply. Checks the ledger afterwards as `load.py` does and prints one JSON object (also written to
`--out`).
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from floorguard import Ledger, ReplyTimeout

sys.path.insert(0, str(Path(__file__).resolve().parent))
import load  # noqa: E402

FUNDS = 1_000_000_000  # per wallet: far more than the charges take
AMOUNT = 1_000
REPLY_TIMEOUT_S = 10.0  # the client's own default: a charge not answered by then is sent again
PARTITIONS_SHARED_OUT_TIMEOUT_S = 120


def percentile(ordered: list[float], share: float) -> float:
    """Nearest rank: the smallest value at least `share` % of the values are at or below."""
    rank = max(1, -(-len(ordered) * share // 100))
    return ordered[int(rank) - 1]


async def charges(ledger: Ledger, wallets: list[str], count: int) -> tuple[list[float], int]:
    """Latencies in ms of the charges answered, and how many timed out."""
    latencies_ms = []
    timed_out = 0
    for n in range(count):
        began = time.perf_counter()
        try:
            await ledger.charge(wallets[n % len(wallets)], AMOUNT, id=f"lone-{n}")
        except ReplyTimeout:
            timed_out += 1
            continue
        latencies_ms.append((time.perf_counter() - began) * 1000)
    return latencies_ms, timed_out


async def main(args, current=None) -> dict:
    current = current or load.resolve_settings()
    settings, database = await load.setup(args, current)
    (worker, port), = load.start_workers(settings, 1, Path(args.logs))
    wallets = [f"w{i}" for i in range(args.wallets)]
    try:
        await load.shared_out([port], settings.partitions, PARTITIONS_SHARED_OUT_TIMEOUT_S)
        async with Ledger(settings.kafka_bootstrap, topic_prefix=settings.topics.prefix,
                          timeout_s=REPLY_TIMEOUT_S) as ledger:  # fmt: skip
            for wallet in wallets:  # also warms the worker up: its connections, its caches
                await ledger.open(wallet)
                await ledger.credit(wallet, FUNDS)
            latencies_ms, timed_out = await charges(ledger, wallets, args.commands)
        checks = await load.check(settings)
        resident_mib = [load.resident_size_mib(worker.pid)]
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)
        admin = await load.asyncpg.connect(current.database_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        finally:
            await admin.close()
        await load.delete_topics(current.kafka_bootstrap, settings.topics)
    ordered = sorted(latencies_ms)
    checks["sends_without_reply"] = timed_out
    checks["ok"] = checks["ok"] and timed_out == 0
    return {
        "commands": args.commands, "wallets": args.wallets, "answered": len(ordered), "timed_out": timed_out,
        "latency_ms": {name: round(percentile(ordered, share), 2) if ordered else None
                       for name, share in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))},
        "mean_ms": round(sum(ordered) / len(ordered), 2) if ordered else None,
        "checks": checks, "worker_resident_mib": resident_mib,
    }  # fmt: skip


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commands", type=int, default=500, help="charges, one at a time")
    parser.add_argument("--wallets", type=int, default=10, help="charged round robin")
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--logs", default=str(load.ROOT / ".floorguard" / "latency-logs"))
    parser.add_argument("--out", help="write the JSON result here too")
    return parser.parse_args(argv)


if __name__ == "__main__":
    load.run_from_command_line(main, arguments)
