"""Open-loop load against the real worker: a fixed offered rate, whatever the replies do.

    .venv/bin/python loadtest/load.py --rate 5000 --seconds 20 --distribution zipf --wallets 10000

Sets up its own ledger (a fresh database and topic prefix on the services named by
FLOORGUARD_KAFKA_BOOTSTRAP / FLOORGUARD_DATABASE_URL, else the local stack), starts `--workers`
worker processes, opens and funds the wallets, then runs the offer: `loadtest/gen`, a Go program
(franz-go), sends commands on a fixed schedule (open loop: a command is sent when its time comes,
not when the previous one is answered) and times every reply (sent → reply received). The mix:
charges, holds (reserve, then capture or release once the reserve is answered) and retries (a
command sent again under its id). The offer is in Go because the generator must not be the limit
of what it measures: in Python a command cost it 25–40 µs of CPU (docs/BENCHMARKS.md). At the end
it checks that no wallet went below its floor, that every command got exactly one decision and
every send its reply, and prints one JSON object (also written to `--out`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
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
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from worker import config  # noqa: E402
from worker.adapter.topics import create_topics, delete_topics  # noqa: E402
from worker.core.auth import auth_header  # noqa: E402
from worker.cli import settings as resolve_settings  # noqa: E402
from worker.config import Topics  # noqa: E402
from worker.core.placement import partition_of  # noqa: E402
from worker.store.migrate import migrate  # noqa: E402

GENERATOR_SOURCE = ROOT / "loadtest" / "gen"
GENERATOR_BINARY = ROOT / ".floorguard" / "bin" / "floorguard-gen"
GENERATOR_SECRET_ENV = "FLOORGUARD_GEN_SECRET"
GO_ELSEWHERE = (Path("/usr/local/go/bin/go"),)  # where Go's own archive installs it, when not on PATH
TICK_S = 0.001
DRAIN_TIMEOUT_S = 120
HEALTH_TIMEOUT_S = 5
FUNDS = 10_000_000  # per wallet; the hot wallet gets less, so that its budget runs out mid-run
AMOUNT_MAX = 1_000
LINGER_MS = 1  # what librdkafka gathers into one request: small, for the latency it adds
QUEUED_MAX = 1_000_000
READ_MAX = 10_000
ENDS_TIMEOUT_S = 30


# A command's value, formatted as bytes directly (its ids and wallet names are plain ASCII): a
# fraction of what json.dumps and encode cost per command.
CHARGE = b'{"v":1,"op":"charge","id":"%s","wallet":"%s","amount":%d}'
RESERVE = b'{"v":1,"op":"reserve","id":"%s","wallet":"%s","amount":%d}'
CAPTURE = b'{"v":1,"op":"capture","id":"%s","wallet":"%s","hold":"%s","amount":%d}'
RELEASE = b'{"v":1,"op":"release","id":"%s","wallet":"%s","hold":"%s"}'
OPEN = b'{"v":1,"op":"open","id":"open","wallet":"%s"}'
CREDIT = b'{"v":1,"op":"credit","id":"fund","wallet":"%s","amount":%d}'

Placed = tuple[bytes, int]  # a wallet's record key and the partition Kafka's default partitioner gives it


@dataclass
class Run:
    """What the Python client (the funding before the offer) has sent and had answered."""

    sent_at: dict[bytes, float] = field(default_factory=dict)  # correlation id -> send time, until its reply
    answered: int = 0


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
    """Sends commands and reads their replies through librdkafka (confluent-kafka), whose produce and
    consume cost about a microsecond or two of this process's Python per record: the generator must
    not be the limit of what it measures (aiokafka, in Python, spends 20 µs and more per command on
    its batches, requests and responses).

    A record goes to the partition Kafka's default partitioner (murmur2) gives its key, set
    explicitly: librdkafka's own default partitioner is another hash, and the worker relies on a
    wallet's commands being where any client puts them. `send` hands a record to librdkafka, which
    batches what arrives within `linger.ms`; `flush`, called once a tick, serves its delivery
    reports and raises the first the broker refused. The offer never waits for the broker.
    """

    def __init__(self, settings: config.Settings, run: Run, key: tuple[str, str] | None = None) -> None:
        self.settings, self.run = settings, run
        self.key = key
        self.topic = settings.topics.commands
        self.producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "acks": "all",
                                  "enable.idempotence": True, "linger.ms": LINGER_MS,
                                  "queue.buffering.max.messages": QUEUED_MAX,
                                  "delivery.report.only.error": True, "on_delivery": self._delivered})  # fmt: skip
        self.consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": f"{settings.topics.prefix}-load",
                                  "enable.auto.commit": False, "fetch.wait.max.ms": 100})  # fmt: skip
        self.reply_to = ("reply_to", settings.topics.replies.encode())
        self.placed: dict[str, Placed] = {}
        self.failed: KafkaException | None = None  # the first record the broker did not take

    async def start(self) -> None:
        self.consumer.assign(await asyncio.to_thread(ends, self.consumer, self.settings.topics.replies,
                                                     self.settings.partitions))  # fmt: skip
        self.reader = asyncio.create_task(self._read())

    async def stop(self) -> None:
        self.reader.cancel()
        await asyncio.gather(self.reader, return_exceptions=True)
        await asyncio.to_thread(self.producer.flush, 10)
        await asyncio.to_thread(self.consumer.close)

    @property
    def queued(self) -> int:
        """Records handed to librdkafka and not acknowledged yet."""
        return len(self.producer)

    def place(self, wallet: str) -> Placed:
        """Murmur2 in pure Python costs microseconds: each wallet is placed once."""
        placed = self.placed.get(wallet)
        if placed is None:
            key = wallet.encode()
            placed = self.placed[wallet] = key, partition_of(key, self.settings.partitions)
        return placed

    def send(self, wallet: Placed, value: bytes, correlation_id: bytes, now: float) -> None:
        """Hands a command to the producer."""
        self.run.sent_at[correlation_id] = now
        key, partition = wallet
        headers = [self.reply_to, ("correlation_id", correlation_id)]
        if self.key is not None:
            headers.append(auth_header(self.key[0], self.key[1], value))
        produce(self.producer, self.topic, value, key, partition, headers)

    def flush(self) -> None:
        """Serves the delivery reports; raises the first record the broker refused."""
        self.producer.poll(0)
        if self.failed is not None:
            raise self.failed

    def _delivered(self, error, record) -> None:
        if error is not None and self.failed is None:
            self.failed = KafkaException(error)

    async def _read(self) -> None:
        """Per reply: its correlation id, found among the headers without a dict."""
        run = self.run
        while True:
            records = self.consumer.consume(READ_MAX, 0)
            if not records:
                await asyncio.sleep(TICK_S)
                continue
            for record in records:
                if record.error() is not None:
                    raise KafkaException(record.error())
                for name, correlation_id in record.headers() or ():
                    if name == "correlation_id":
                        break
                else:
                    continue
                if run.sent_at.pop(correlation_id, None) is not None:  # else answered already, or not this run's
                    run.answered += 1
            await asyncio.sleep(0)


def produce(producer: Producer, topic: str, value: bytes, key: bytes, partition: int, headers: list) -> None:
    """One record to librdkafka; while its queue is full, waits for deliveries to make room."""
    while True:
        try:
            producer.produce(topic, value, key, partition=partition, headers=headers)
            return
        except BufferError:
            producer.poll(0.01)


def ends(consumer: Consumer, topic: str, partitions: int) -> list[TopicPartition]:
    """Each partition of `topic` at its current end. Retried: right after a topic is created its
    leaders may not be known yet."""
    deadline = time.monotonic() + ENDS_TIMEOUT_S
    while True:
        try:
            return [TopicPartition(topic, p, consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=5)[1])
                    for p in range(partitions)]  # fmt: skip
        except KafkaException:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.2)


async def fund(client: Client, wallets: list[str], hot_funds: int) -> None:
    now = time.monotonic()
    for i, name in enumerate(wallets):
        wallet = client.place(name)
        key = wallet[0]
        client.send(wallet, OPEN % key, b"open-" + key, now)
        client.send(wallet, CREDIT % (key, hot_funds if i == 0 else FUNDS), b"fund-" + key, now)
    await drain(client, DRAIN_TIMEOUT_S)


async def drain(client: Client, timeout_s: float) -> None:
    """Until every send is answered."""
    deadline = time.monotonic() + timeout_s
    while client.run.sent_at and time.monotonic() < deadline:
        client.flush()
        await asyncio.sleep(TICK_S if client.queued else 0.05)


async def check(settings: config.Settings, unanswered: int = 0) -> dict:
    """The ledger's guarantees after a run; `unanswered`: the sends the run got no reply to."""
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
    return {"wallets_below_floor": below, "ids_with_two_decisions": repeated, "wallets_off_their_books": books,
            "sends_without_reply": unanswered,
            "ok": below == 0 and repeated == 0 and books == 0 and unanswered == 0}  # fmt: skip


def build_generator() -> Path:
    """The offer's Go program, built (or found up to date: Go caches its builds) into .floorguard/bin."""
    go = shutil.which("go") or next((str(path) for path in GO_ELSEWHERE if path.exists()), None)
    if go is None:
        raise RuntimeError(f"the load generator ({GENERATOR_SOURCE.relative_to(ROOT)}) is a Go program: "
                           "install Go (1.26 or later) and run again")  # fmt: skip
    GENERATOR_BINARY.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([go, "build", "-o", str(GENERATOR_BINARY), "."], cwd=GENERATOR_SOURCE, check=True)
    return GENERATOR_BINARY


async def generate(binary: Path, args, settings: config.Settings, key: tuple[str, str] | None,
                   log: Path) -> dict:  # fmt: skip
    """Runs the offer; its report (its own CPU included)."""
    command = [str(binary), "-brokers", settings.kafka_bootstrap, "-commands", settings.topics.commands,
               "-replies", settings.topics.replies, "-rate", str(args.rate), "-seconds", str(args.seconds),
               "-wallets", str(args.wallets), "-distribution", args.distribution, "-hold-share", str(args.hold_share),
               "-retry-share", str(args.retry_share), "-seed", str(args.seed),
               "-drain-timeout", f"{DRAIN_TIMEOUT_S}s"]  # fmt: skip
    if args.generator_profile:
        command += ["-cpuprofile", args.generator_profile]
    if args.eager:
        command.append("-eager")
    env = dict(os.environ)
    if key is not None:
        command += ["-key-id", key[0]]
        env[GENERATOR_SECRET_ENV] = key[1]  # not on the command line, where `ps` shows it
    with log.open("wb") as errors:
        process = await asyncio.create_subprocess_exec(*command, env=env, stdout=asyncio.subprocess.PIPE,
                                                       stderr=errors)  # fmt: skip
        out, _ = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"the load generator failed ({process.returncode}): {log.read_text()[-2000:]}")
    return json.loads(out)


async def main(args, current: config.Settings | None = None, on_offer=None) -> dict:
    """One run. `on_offer(worker_pids)`, when given, is started as a task once the offer begins."""
    current = current or resolve_settings()
    binary = await asyncio.to_thread(build_generator)
    settings, database = await setup(args, current)
    log_dir = Path(args.logs)
    started = start_workers(settings, args.workers, log_dir, auth=args.auth)
    workers = [process for process, _ in started]
    key = await admin_key(settings) if args.auth else None
    client = Client(settings, Run(), key)
    try:
        await client.start()
        try:
            await shared_out([port for _, port in started], settings.partitions)
            await fund(client, [f"w{i}" for i in range(args.wallets)], hot_funds=args.rate * args.seconds * AMOUNT_MAX // 4)
        finally:
            await client.stop()
        began = time.monotonic()
        cpu_before = cpu_seconds([worker.pid for worker in workers])
        watcher = asyncio.create_task(on_offer([worker.pid for worker in workers])) if on_offer else None
        offered = await generate(binary, args, settings, key, log_dir / "generator.log")
        elapsed_s = time.monotonic() - began
        cpu_after = cpu_seconds([worker.pid for worker in workers])
        if watcher is not None:
            await watcher
        checks = await check(settings, offered["sends_without_reply"])
        resident_mib = [resident_size_mib(worker.pid) for worker in workers]
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        for worker in workers:
            worker.wait(timeout=60)
        admin = await asyncpg.connect(current.database_url)
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await admin.close()
        await delete_topics(current.kafka_bootstrap, settings.topics)
    sent, answered = offered["sent"], offered["answered"]
    cores = {part: (cpu_after[part] - cpu_before[part]) / elapsed_s for part in cpu_after}
    cores["load generator"] += offered["cpu_s"] / elapsed_s  # this process's share, and the Go program's
    return {
        "distribution": args.distribution, "wallets": args.wallets, "workers": args.workers,
        "offered_per_s": args.rate, "seconds": args.seconds, "eager": args.eager, "sent": sent, "answered": answered,
        "sent_per_s": round(sent / offered["offered_s"]), "answered_per_s": round(answered / offered["answered_s"]),
        "latency_ms": {q: round(ms, 2) for q, ms in offered["latency_ms"].items()},
        # Where a reply's time went (an eager offer only: timing each acknowledgement costs the
        # generator a callback and a lock per record): the command acknowledged by the broker,
        # then the worker producing its reply, then the reply read.
        "stages_ms": {stage: {q: round(ms, 2) for q, ms in quantiles.items()}
                      for stage, quantiles in offered["stages_ms"].items()},
        "timeline": [[int(s), int(n), round(ms, 2)] for s, n, ms in offered["timeline"]],
        "statuses": offered["statuses"], "checks": checks, "worker_resident_mib": resident_mib,
        # Cores each part kept busy on average while commands were offered and answered.
        "cores_busy": {part: round(busy, 2) for part, busy in cores.items()},
        # The Go program's own CPU (getrusage) from its first command offered to its last reply, per command answered.
        "generator_cpu_us_per_command": round(offered["cpu_s"] * 1_000_000 / answered, 1) if answered else None,
    }  # fmt: skip


def cpu_seconds(worker_pids: list[int]) -> dict[str, float]:
    """CPU time so far of the worker processes, this load generator, the broker and the database."""
    return cpu_of(parts_of(worker_pids))


def parts_of(worker_pids: list[int]) -> dict[str, list[int]]:
    """The processes of each part, as they are now (a walk over /proc: call it outside timed loops)."""
    parts: dict[str, list[int]] = {"worker": [], "load generator": [os.getpid()], "kafka": [], "postgresql": []}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue  # gone meanwhile
        if pid in worker_pids:
            parts["worker"].append(pid)
        elif b"kafka.Kafka" in command:
            parts["kafka"].append(pid)
        elif stat.split()[1] == "(postgres)":
            parts["postgresql"].append(pid)
    return parts


def cpu_of(parts: dict[str, list[int]]) -> dict[str, float]:
    """CPU time (user + system) so far of each part's processes; one that is gone counts nothing."""
    ticks = os.sysconf("SC_CLK_TCK")
    used = {}
    for part, pids in parts.items():
        total = 0
        for pid in pids:
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            total += int(fields[11]) + int(fields[12])
        used[part] = total / ticks
    return used


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
    parser.add_argument("--eager", action="store_true",
                        help="send each command when its time comes and read each reply as it lands, as an agent "
                             "does (for latency; the generator's CPU per command rises at low rates)")  # fmt: skip
    parser.add_argument("--generator-profile", help="write the Go generator's CPU profile (pprof) here")
    parser.add_argument("--out", help="write the JSON result here too")
    return parser.parse_args(argv)


def run_from_command_line(main, arguments, shown=lambda result: result) -> dict:
    """One run of a load tool from its command line: the whole result to `--out`, `shown` of it printed."""
    args = arguments()
    result = asyncio.run(main(args))
    if args.out:
        Path(args.out).write_text(json.dumps(result))
    print(json.dumps(shown(result)))
    return result


if __name__ == "__main__":
    run_from_command_line(main, arguments, lambda result: {k: v for k, v in result.items() if k != "timeline"})
