"""Drain: how fast one worker process decides a backlog, and what each command costs in CPU.

    .venv/bin/python loadtest/drain.py --commands 200000 --distribution uniform --wallets 10000
    .venv/bin/python loadtest/drain.py --commands 200000 --distribution hot

Sets up its own ledger (as `load.py` does), opens and funds the wallets through a worker, stops
that worker, then preloads the commands topic (charges, 5% of them sent again under their id, each
with a reply address), and only then starts one worker process. Timed from the first event the
worker publishes to the last; CPU per command is read from `/proc` for each part (worker, this
generator, broker, PostgreSQL) at those two moments. Checks afterwards that every command was
answered once, no wallet is below its floor and every wallet is on its books.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import load  # noqa: E402

AMOUNT_MAX = 1_000
READ_RECORDS_MAX = 20_000
DRAIN_TIMEOUT_S = 300
PROFILE_AFTER_S = 4  # the worker's start and its first batches, left out of the profile
PROFILE_SECONDS = 5


def commands(count: int, wallets: list[str], distribution: str, retry_share: float, rng: random.Random) -> list[tuple[bytes, bytes, str]]:
    """(key, value, correlation id) of each command, encoded before anything is timed."""
    choose = load.pick(distribution, len(wallets), rng)
    out: list[tuple[bytes, bytes, str]] = []
    for n in range(count):
        if out and rng.random() < retry_share:
            key, value, correlation = out[rng.randrange(len(out))]
            out.append((key, value, f"{correlation}-r{n}"))
            continue
        wallet = wallets[choose()]
        value = b'{"v":1,"op":"charge","id":"c%d","wallet":"%s","amount":%d}' % (n, wallet.encode(), rng.randint(1, AMOUNT_MAX))
        out.append((wallet.encode(), value, f"c{n}"))
    return out


async def preload(settings, batch: list[tuple[bytes, bytes, str]]) -> None:
    """Every command onto the commands topic, each on its key's partition (murmur2), acknowledged."""
    failed = []
    producer = load.Producer({"bootstrap.servers": settings.kafka_bootstrap, "acks": "all", "enable.idempotence": True,
                              "linger.ms": 20, "queue.buffering.max.messages": load.QUEUED_MAX,
                              "delivery.report.only.error": True,
                              "on_delivery": lambda error, record: failed.append(error)})  # fmt: skip
    reply_to = ("reply_to", settings.topics.replies.encode())
    placed: dict[bytes, int] = {}
    for key, value, correlation in batch:
        partition = placed.get(key)
        if partition is None:
            partition = placed[key] = load.partition_of(key, settings.partitions)
        headers = [reply_to, ("correlation_id", correlation.encode())]
        load.produce(producer, settings.topics.commands, value, key, partition, headers)
    left = await asyncio.to_thread(producer.flush, 60)
    if left:
        raise TimeoutError(f"{left:,} commands not acknowledged by the broker within 60 s")
    if failed:
        raise load.KafkaException(failed[0])


async def watch(settings, expected_replies: int, worker_pid: int) -> dict:
    """Reads replies and events from their ends until every command is answered; CPU and time at
    the first and the last event. librdkafka's consumer reads them: this process's own CPU stays
    out of the worker's way."""
    consumer = load.Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": f"{settings.topics.prefix}-drain",
                              "enable.auto.commit": False, "fetch.wait.max.ms": 20})  # fmt: skip
    try:
        consumer.assign(await asyncio.to_thread(load.ends, consumer, settings.topics.events, settings.partitions)
                        + await asyncio.to_thread(load.ends, consumer, settings.topics.replies, settings.partitions))  # fmt: skip
        answered: set[bytes] = set()
        event_count = 0
        first = last = None
        first_ms = last_ms = 0
        parts = None
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while len(answered) < expected_replies:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(answered):,} of {expected_replies:,} commands answered in {DRAIN_TIMEOUT_S} s")
            records = await asyncio.to_thread(consumer.consume, READ_RECORDS_MAX, 0.1)
            events = 0
            for record in records:
                if record.error() is not None:
                    raise load.KafkaException(record.error())
                if record.topic() == settings.topics.events:
                    if first is None:
                        parts = load.parts_of([worker_pid])  # the worker's database sessions exist by now
                        first = (time.monotonic(), load.cpu_of(parts))
                        first_ms = record.timestamp()[1]
                    events += 1
                    last_ms = max(last_ms, record.timestamp()[1])
                else:
                    for name, value in record.headers() or ():
                        if name == "correlation_id":
                            answered.add(value)
            if events:
                event_count += events
                last = (time.monotonic(), load.cpu_of(parts))
        assert first is not None and last is not None
    finally:
        await asyncio.to_thread(consumer.close)
    return {"events": event_count, "answered": len(answered), "first": first, "last": last,
            "first_ms": first_ms, "last_ms": last_ms}  # fmt: skip


async def main(args) -> dict:
    current = load.resolve_settings()
    settings, database = await load.setup(args, current)
    rng = random.Random(args.seed)
    wallets = [f"w{i}" for i in range(args.wallets)]
    log_dir = Path(args.logs)
    try:
        (funder, port), = load.start_workers(settings, 1, log_dir)
        client = load.Client(settings, load.Run())
        await client.start()
        try:
            await load.shared_out([port], settings.partitions)
            await load.fund(client, wallets, hot_funds=args.commands * AMOUNT_MAX // 4)
        finally:
            await client.stop()
            funder.send_signal(signal.SIGTERM)
            funder.wait(timeout=60)
        batch = commands(args.commands, wallets, args.distribution, args.retry_share, rng)
        began = time.monotonic()
        await preload(settings, batch)
        preload_s = time.monotonic() - began
        (worker, _), = load.start_workers(settings, 1, log_dir)
        spy = asyncio.create_task(profile(worker.pid, args.profile)) if args.profile else None
        try:
            seen = await watch(settings, len(batch), worker.pid)
            checks = await load.check(settings)
            resident_mib = load.resident_size_mib(worker.pid)
        finally:
            if spy is not None:
                await spy
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=60)
    finally:
        admin = await load.asyncpg.connect(current.database_url)
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await admin.close()
        await load.delete_topics(current.kafka_bootstrap, settings.topics)
    (t0, cpu0), (t1, cpu1) = seen["first"], seen["last"]
    span_s = max((seen["last_ms"] - seen["first_ms"]) / 1000, 1e-3)
    count = len(batch)
    return {
        "distribution": args.distribution, "wallets": args.wallets, "commands": count,
        "events": seen["events"], "answered": seen["answered"], "preload_s": round(preload_s, 1),
        "drain_s": round(span_s, 2), "commands_per_s": round(count / span_s),
        # CPU each part used per command between the first and the last event.
        "cpu_us_per_command": {part: round((cpu1[part] - cpu0[part]) * 1e6 / count, 1) for part in cpu1},
        "wall_s_observed": round(t1 - t0, 2),
        "checks": {k: v for k, v in checks.items() if k != "sends_without_reply"} | {"ok": all(
            checks[k] == 0 for k in ("wallets_below_floor", "ids_with_two_decisions", "wallets_off_their_books"))
            and seen["answered"] == count},
        "worker_resident_mib": resident_mib,
    }  # fmt: skip


async def profile(pid: int, out: str) -> None:
    """py-spy samples the worker (without pausing it) from a moment after its start, for a few
    seconds of the drain; `--profile` names the raw output (folded stacks, one per line)."""
    await asyncio.sleep(PROFILE_AFTER_S)
    spy = Path(sys.executable).parent / "py-spy"
    process = await asyncio.create_subprocess_exec(
        str(spy), "record", "--nonblocking", "-p", str(pid), "-d", str(PROFILE_SECONDS), "-r", "200", "-f", "raw",
        "-o", out, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)  # fmt: skip
    await process.wait()


def top_frames(raw: Path, count: int = 40) -> list[tuple[float, str]]:
    """The frames the worker's busy samples pass through most (inclusive share, %)."""
    inclusive: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, samples = line.rpartition(" ")
        if "Condition.wait" in stack or "Event.wait" in stack:
            continue  # idle threads
        total += int(samples)
        for frame in set(stack.split(";")):
            inclusive[frame] = inclusive.get(frame, 0) + int(samples)
    ranked = sorted(inclusive.items(), key=lambda item: -item[1])[:count]
    return [(round(100 * n / max(total, 1), 1), frame) for frame, n in ranked]


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commands", type=int, default=200_000)
    parser.add_argument("--distribution", choices=("uniform", "zipf", "hot"), default="uniform")
    parser.add_argument("--wallets", type=int, default=10_000)
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--retry-share", type=float, default=0.05, help="share of commands sent again under their id")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--logs", default=str(load.ROOT / ".floorguard" / "drain-logs"))
    parser.add_argument("--out", help="write the JSON result here too")
    parser.add_argument("--profile", help="sample the worker with py-spy into this file, and print its top frames")
    return parser.parse_args(argv)


if __name__ == "__main__":
    load.run_from_command_line(main, arguments)
    profiled = arguments().profile
    if profiled:
        for share, frame in top_frames(Path(profiled)):
            print(f"{share:5.1f}%  {frame}")
