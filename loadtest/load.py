"""Open-loop load against the real worker: a fixed offered rate, whatever the replies do.

    .venv/bin/python loadtest/load.py --rate 5000 --seconds 20 --distribution zipf --wallets 10000

Sets up its own ledger (a fresh database and topic prefix on the services named by
FLOORGUARD_KAFKA_BOOTSTRAP / FLOORGUARD_DATABASE_URL, else the local stack), starts `--workers`
worker processes, funds the wallets, then sends commands on a fixed schedule (open loop: a command
is sent when its time comes, not when the previous one is answered). The mix: charges, holds
(reserve, then capture or release once the reserve is answered) and retries (a command sent again
under its id). Every reply's latency (sent → reply received) goes into an HDR histogram. At the end
it checks that no wallet went below its floor, that every command got exactly one decision and
every send its reply, and prints one JSON object (also written to `--out`).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from bisect import bisect
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from hdrh.histogram import HdrHistogram

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from worker import config  # noqa: E402
from worker.adapter.topics import create_topics, delete_topics  # noqa: E402
from worker.core.auth import auth_header  # noqa: E402
from worker.cli import settings as resolve_settings  # noqa: E402
from worker.config import Topics  # noqa: E402
from worker.store.migrate import migrate  # noqa: E402

LATENCY_MAX_US = 60_000_000
TICK_S = 0.001
DRAIN_TIMEOUT_S = 120
HEALTH_TIMEOUT_S = 5
FUNDS = 10_000_000  # per wallet; the hot wallet gets less, so that its budget runs out mid-run
AMOUNT_MAX = 1_000


@dataclass
class Run:
    histogram: HdrHistogram = field(default_factory=lambda: HdrHistogram(1, LATENCY_MAX_US, 3))
    sent_at: dict[str, float] = field(default_factory=dict)  # correlation id -> monotonic send time
    commands: dict[str, dict] = field(default_factory=dict)  # correlation id -> command
    replies: dict[str, dict] = field(default_factory=dict)
    timeline: dict[int, list[int]] = field(default_factory=dict)  # second -> [replies, sum latency us]
    started: float = 0.0
    waiting: int = 0


def pick(distribution: str, wallets: int, rng: random.Random):
    if distribution == "hot":
        return lambda: 0
    if distribution == "uniform":
        return lambda: rng.randrange(wallets)
    weights = list(accumulate(1 / (rank + 1) for rank in range(wallets)))  # Zipf, exponent 1.0
    return lambda: bisect(weights, rng.random() * weights[-1])


async def setup(args, current) -> tuple[config.Settings, str]:
    prefix = f"load-{uuid.uuid4().hex[:8]}"
    name = prefix.replace("-", "_")
    admin = await asyncpg.connect(current.database_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    database_url = urlunsplit(urlsplit(current.database_url)._replace(path=f"/{name}"))
    await migrate(database_url)
    topics = Topics(prefix)
    await create_topics(current.kafka_bootstrap, topics, args.partitions)
    return config.Settings(current.kafka_bootstrap, database_url, topics, f"{prefix}-worker", args.partitions), name


def start_workers(settings: config.Settings, count: int, log_dir: Path,
                  auth: bool = False) -> list[tuple[subprocess.Popen, int]]:  # fmt: skip
    """Worker processes, each with the port of its /health."""
    env = {**os.environ, config.ENV_KAFKA_BOOTSTRAP: settings.kafka_bootstrap,
           config.ENV_DATABASE_URL: settings.database_url, config.ENV_TOPIC_PREFIX: settings.topics.prefix,
           config.ENV_GROUP_ID: settings.group_id}  # fmt: skip
    if auth:
        env.pop(config.ENV_MASTER_SECRET_FILE, None)  # the local stack's; this run's ledger has its own
        env.update({config.ENV_AUTH: "required", config.ENV_MASTER_SECRET: LOAD_MASTER_SECRET.decode()})
    log_dir.mkdir(parents=True, exist_ok=True)
    started = []
    for i in range(count):
        port = free_port()
        process = subprocess.Popen([sys.executable, "-m", "worker.cli", "worker"], cwd=ROOT,
                                   env={**env, config.ENV_METRICS_PORT: str(port)},
                                   stdout=(log_dir / f"worker-{i}.log").open("wb"), stderr=subprocess.STDOUT)  # fmt: skip
        started.append((process, port))
    return started


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def shared_out(ports: list[int], partitions: int, timeout_s: float = 120) -> list[list[int]]:
    """Until every worker owns a share and together they own every partition exactly once (no
    rebalance under way); returns each worker's share."""
    deadline = time.monotonic() + timeout_s
    while True:
        held = [await asyncio.to_thread(health, port) for port in ports]
        shares = [report["partitions"] if report else [] for report in held]
        if all(shares) and sorted(p for share in shares for p in share) == list(range(partitions)):
            return shares
        if time.monotonic() >= deadline:
            raise RuntimeError(f"the workers never shared out the {partitions} partitions: their /health said {held}")
        await asyncio.sleep(0.2)


def health(port: int) -> dict | None:
    """A worker's /health report, healthy (200) or not (503); None when it does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=HEALTH_TIMEOUT_S) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        return json.loads(error.read())
    except OSError:
        return None


# --auth: the workers require signed commands and the generator signs each one with an admin key,
# as an operator's tooling would (a per-run secret: the run's database is its own).
LOAD_MASTER_SECRET = f"load-master-{uuid.uuid4().hex}{uuid.uuid4().hex}".encode()


async def admin_key(settings: config.Settings) -> tuple[str, str]:
    from worker.core.auth import Scope
    from worker.store import keys

    connection = await asyncpg.connect(settings.database_url)
    try:
        made = await keys.create_key(connection, LOAD_MASTER_SECRET, Scope.ADMIN, label="load generator")
    finally:
        await connection.close()
    return made.key.key_id, made.secret


class Client:
    def __init__(self, settings: config.Settings, run: Run, key: tuple[str, str] | None = None) -> None:
        self.settings, self.run = settings, run
        self.key = key
        self.producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", linger_ms=1,
                                         max_batch_size=262_144, enable_idempotence=True)  # fmt: skip
        self.consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False,
                                         fetch_max_wait_ms=5)  # fmt: skip
        self.on_reply = lambda command, reply: None
        self.pending: list[asyncio.Future] = []

    async def start(self) -> None:
        await self.producer.start()
        await self.consumer.start()
        parts = [TopicPartition(self.settings.topics.replies, p) for p in range(self.settings.partitions)]
        self.consumer.assign(parts)
        await self.consumer.seek_to_end(*parts)
        for tp in parts:
            await self.consumer.position(tp)
        self.reader = asyncio.create_task(self._read())

    async def stop(self) -> None:
        self.reader.cancel()
        await asyncio.gather(self.reader, return_exceptions=True)
        await self.producer.stop()
        await self.consumer.stop()

    async def send(self, command: dict, tag: str = "") -> None:
        correlation_id = command["id"] + tag
        self.run.sent_at[correlation_id] = time.monotonic()
        self.run.commands[correlation_id] = command
        self.run.waiting += 1
        value = json.dumps(command, separators=(",", ":")).encode()
        headers = [("reply_to", self.settings.topics.replies.encode()), ("correlation_id", correlation_id.encode())]
        if self.key is not None:
            headers.append(auth_header(self.key[0], self.key[1], value))
        self.pending.append(await self.producer.send(
            self.settings.topics.commands, value, key=command["wallet"].encode(), headers=headers))  # fmt: skip
        if len(self.pending) > 10_000:
            await asyncio.gather(*self.pending)
            self.pending.clear()

    async def _read(self) -> None:
        while True:
            for records in (await self.consumer.getmany(timeout_ms=50, max_records=10_000)).values():
                now = time.monotonic()
                for record in records:
                    correlation_id = dict(record.headers)["correlation_id"].decode()
                    sent = self.run.sent_at.get(correlation_id)
                    if sent is None or correlation_id in self.run.replies:
                        continue
                    reply = json.loads(record.value)
                    self.run.replies[correlation_id] = reply
                    self.run.waiting -= 1
                    latency_us = max(int((now - sent) * 1_000_000), 1)
                    self.run.histogram.record_value(min(latency_us, LATENCY_MAX_US))
                    second = self.run.timeline.setdefault(int(now - self.run.started), [0, 0])
                    second[0] += 1
                    second[1] += latency_us
                    self.on_reply(self.run.commands[correlation_id], reply)


async def fund(client: Client, wallets: list[str], hot_funds: int) -> None:
    for i, wallet in enumerate(wallets):
        await client.send({"v": 1, "op": "open", "id": "open", "wallet": wallet}, tag=f"-{wallet}")
        amount = hot_funds if i == 0 else FUNDS
        await client.send({"v": 1, "op": "credit", "id": "fund", "wallet": wallet, "amount": amount}, tag=f"-{wallet}")
    await drain(client, DRAIN_TIMEOUT_S)


async def drain(client: Client, timeout_s: float) -> None:
    await asyncio.gather(*client.pending)
    client.pending.clear()
    deadline = time.monotonic() + timeout_s
    while client.run.waiting > 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


async def offer(client: Client, args, wallets: list[str], rng: random.Random) -> int:
    """Send at the offered rate for the run's length; return the number of commands sent."""
    choose = pick(args.distribution, len(wallets), rng)
    history: list[dict] = []
    sent = 0
    started = time.monotonic()
    while (elapsed := time.monotonic() - started) < args.seconds:
        due = int(elapsed * args.rate) - sent
        for _ in range(due):
            sent += 1
            kind = rng.random()
            if kind < args.retry_share and history:
                await client.send(rng.choice(history), tag=f"-r{sent}")  # the same command, again
                continue
            wallet = wallets[choose()]
            op = "reserve" if kind < args.retry_share + args.hold_share else "charge"
            command = {"v": 1, "op": op, "id": f"{op[0]}{sent}", "wallet": wallet, "amount": rng.randint(1, AMOUNT_MAX)}
            await client.send(command)
            if len(history) < 10_000:
                history.append(command)
        await asyncio.sleep(TICK_S)
    return sent


def close_holds(client: Client, rng: random.Random):
    def on_reply(command: dict, reply: dict) -> None:
        if command["op"] == "reserve" and reply["ok"] and not reply["duplicate"]:
            op = "capture" if rng.random() < 0.8 else "release"
            follow = {"v": 1, "op": op, "id": f"{op[0]}-{command['id']}", "wallet": command["wallet"],
                      "hold": reply["hold"]}  # fmt: skip
            if op == "capture":
                follow["amount"] = rng.randint(0, reply["amount"])
            asyncio.get_running_loop().create_task(client.send(follow))
    return on_reply


async def check(settings: config.Settings, run: Run) -> dict:
    connection = await asyncpg.connect(settings.database_url)
    try:
        below = await connection.fetchval("SELECT count(*) FROM wallets WHERE balance - reserved < floor")
        repeated = await connection.fetchval("SELECT count(*) FROM (SELECT wallet, id FROM decisions "
                                             "GROUP BY wallet, id HAVING count(*) > 1) AS r")  # fmt: skip
        books = await connection.fetchval(
            "SELECT count(*) FROM wallets AS w WHERE balance <> (SELECT coalesce(sum(CASE WHEN op = 'credit' "
            "THEN amount ELSE -amount END), 0) FROM decisions AS d WHERE d.wallet = w.wallet AND status = 200 "
            "AND op IN ('credit', 'charge', 'capture'))")  # fmt: skip
    finally:
        await connection.close()
    unanswered = sum(1 for c in run.sent_at if c not in run.replies)
    return {"wallets_below_floor": below, "ids_with_two_decisions": repeated, "wallets_off_their_books": books,
            "sends_without_reply": unanswered,
            "ok": below == 0 and repeated == 0 and books == 0 and unanswered == 0}  # fmt: skip


async def main(args, current: config.Settings | None = None, on_offer=None) -> dict:
    """One run. `on_offer(worker_pids)`, when given, is started as a task once the offer begins."""
    current = current or resolve_settings()
    settings, database = await setup(args, current)
    started = start_workers(settings, args.workers, Path(args.logs), auth=args.auth)
    workers = [process for process, _ in started]
    run, rng = Run(), random.Random(args.seed)
    client = Client(settings, run, await admin_key(settings) if args.auth else None)
    try:
        await client.start()
        await shared_out([port for _, port in started], settings.partitions)
        wallets = [f"w{i}" for i in range(args.wallets)]
        await fund(client, wallets, hot_funds=args.rate * args.seconds * AMOUNT_MAX // 4)
        run.histogram.reset()
        run.timeline.clear()
        funded = len(run.replies)
        client.on_reply = close_holds(client, rng)
        # Every send and reply is kept until the end: the collector would walk them all again and
        # again, stalling the generator. Nothing here is cyclic garbage worth collecting mid-run.
        gc.collect()
        gc.freeze()
        gc.disable()
        run.started = time.monotonic()
        cpu_before = cpu_seconds([worker.pid for worker in workers])
        watcher = asyncio.create_task(on_offer([worker.pid for worker in workers])) if on_offer else None
        sent = await offer(client, args, wallets, rng)
        offered_s = time.monotonic() - run.started
        await drain(client, DRAIN_TIMEOUT_S)
        answered_s = time.monotonic() - run.started
        cpu_after = cpu_seconds([worker.pid for worker in workers])
        if watcher is not None:
            await watcher
        checks = await check(settings, run)
        resident_mib = [resident_size_mib(worker.pid) for worker in workers]
    finally:
        gc.enable()
        await client.stop()
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        for worker in workers:
            worker.wait(timeout=60)
        admin = await asyncpg.connect(current.database_url)
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await admin.close()
        await delete_topics(current.kafka_bootstrap, settings.topics)
    answered = len(run.replies) - funded
    h = run.histogram
    return {
        "distribution": args.distribution, "wallets": args.wallets, "workers": args.workers,
        "offered_per_s": args.rate, "seconds": args.seconds, "sent": sent, "answered": answered,
        "sent_per_s": round(sent / offered_s), "answered_per_s": round(answered / answered_s),
        "latency_ms": {q: round(h.get_value_at_percentile(p) / 1000, 2)
                       for q, p in (("p50", 50), ("p99", 99), ("p999", 99.9), ("max", 100))},
        "timeline": [[s, n, round(total / n / 1000, 2)] for s, (n, total) in sorted(run.timeline.items())],
        "checks": checks, "worker_resident_mib": resident_mib,
        # Cores each part kept busy on average while commands were offered and answered.
        "cores_busy": {part: round((cpu_after[part] - cpu_before[part]) / answered_s, 2) for part in cpu_after},
    }  # fmt: skip


def cpu_seconds(worker_pids: list[int]) -> dict[str, float]:
    """CPU time so far of the worker processes, this load generator, the broker and the database."""
    ticks = os.sysconf("SC_CLK_TCK")
    parts = {"worker": 0.0, "load generator": 0.0, "kafka": 0.0, "postgresql": 0.0}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue  # gone meanwhile
        fields = stat[stat.rindex(")") + 2:].split()
        used = (int(fields[11]) + int(fields[12])) / ticks  # utime + stime
        pid = int(entry.name)
        if pid in worker_pids:
            parts["worker"] += used
        elif pid == os.getpid():
            parts["load generator"] += used
        elif b"kafka.Kafka" in command:
            parts["kafka"] += used
        elif stat.split()[1] == "(postgres)":
            parts["postgresql"] += used
    return parts


def resident_size_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=int, default=5_000, help="commands offered per second")
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--distribution", choices=("uniform", "zipf", "hot"), default="zipf")
    parser.add_argument("--wallets", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=1, help="worker processes")
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--hold-share", type=float, default=0.05, help="share of reserves (then capture/release)")
    parser.add_argument("--retry-share", type=float, default=0.05, help="share of commands sent again")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--auth", action="store_true", help="workers require signed commands; every command is signed")
    parser.add_argument("--logs", default=str(ROOT / ".floorguard" / "load-logs"))
    parser.add_argument("--out", help="write the JSON result here too")
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments_ = arguments()
    result = asyncio.run(main(arguments_))
    text = json.dumps(result)
    if arguments_.out:
        Path(arguments_.out).write_text(text)
    print(json.dumps({k: v for k, v in result.items() if k != "timeline"}))
