"""Faults injected during a real load run, then every guarantee checked.

    .venv/bin/python loadtest/chaos.py --seconds 300 --seed 7 --out docs/chaos/summary.json

Sets up its own ledger (a fresh database and topic prefix on the local stack: the faults stop and
start that stack's Kafka and PostgreSQL), runs `floorguard worker --processes N` (a supervisor that
restarts a dead worker) and sends commands at a steady rate while faults come on a schedule drawn
from the seed:

    kill       SIGKILL of a supervised worker at a random moment; the supervisor starts it again
    failpoint  an extra worker joins with FLOORGUARD_FAILPOINT=after_commit:K and SIGKILLs itself
               between a commit and its publish (a rebalance when it joins, another when it dies)
    join       an extra worker joins, decides for a few seconds, and leaves (SIGTERM)
    stall      a supervised worker is frozen (SIGSTOP) past its session timeout while it holds a
               batch, then thawed: the group has moved its partitions, so its commit is fenced
    kafka      the broker is stopped, left down, started again
    postgres   PostgreSQL is stopped, left down, started again; the workers' RSS and fetches are
               sampled every second meanwhile

Then every service is up again and it checks: `floorguard audit` exits 0; every command sent has
exactly one decision; every command sent got a reply equal to its stored decision; every wallet's
balance equals its accepted moves, as the database has them and as the replies tell them; no wallet
below its floor; no hold left open past its expiry (the sweepers survived). It prints one JSON
summary (also written to `--out`); `violations` lists what failed (the goal: none).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loadtest.load import health, resident_size_mib, setup, shared_out  # noqa: E402
from worker import config, stack  # noqa: E402
from worker.adapter.topics import delete_topics  # noqa: E402
from worker.core.codes import ErrorCode  # noqa: E402
from worker.stack import kafka, postgres  # noqa: E402

KINDS = ("kill", "failpoint", "join", "stall", "kafka", "postgres")
FUNDS = 2_000_000  # per wallet: enough for most charges, not all, so that some are refused (402)
AMOUNT_MAX = 2_000
SENDS_IN_FLIGHT_MAX = 5_000  # unacknowledged sends; the offer waits beyond it (a broker outage)
SEND_RETRY_PAUSE_S = 1.0
RECENT_MAX = 1_000
SHORT_HOLD_TTL_MS = 2_000  # reserves left open for the sweepers to expire
SESSION_TIMEOUT_S = 10  # the worker's (worker/adapter/app.py); a stall outlasts it
STALL_S = SESSION_TIMEOUT_S + 5
FAILPOINT_WAIT_S = 40
STOP_WAIT_S = 60
SETTLE_S = 10  # load after the last fault, before the offer stops
DRAIN_TIMEOUT_S = 300
OPEN_TIMEOUT_S = 120  # the wallets opened and funded before the offer
UNSTORED_ERRORS = {code.code for code in ErrorCode if not code.stored}
OUTBOX_GRACE_S = 10  # a row the check sees must be gone this long after (see `outbox_left`)
SAMPLE_EVERY_S = 1.0
AUDIT_TIMEOUT_S = 600
HTTP_TIMEOUT_S = 3
FETCHED = "floorguard_records_fetched_total"


@dataclass
class Ledger:
    """What the load sent and what came back, by correlation id."""

    commands: dict[str, dict] = field(default_factory=dict)
    acked: set[str] = field(default_factory=set)
    replies: dict[str, dict] = field(default_factory=dict)
    send_retries: int = 0


class Load:
    def __init__(self, settings: config.Settings, ledger: Ledger, rng: random.Random) -> None:
        self.settings, self.ledger, self.rng = settings, ledger, rng
        self.producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", linger_ms=5,
                                         enable_idempotence=True)  # fmt: skip
        self.consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False,
                                         auto_offset_reset="earliest")  # fmt: skip
        self.in_flight = asyncio.Semaphore(SENDS_IN_FLIGHT_MAX)
        self.tasks: set[asyncio.Task] = set()
        self.count = 0
        self.recent: list[str] = []  # correlation ids of the latest commands, to send some again
        self.followed: set[tuple[str, str]] = set()  # reserves whose hold was captured or released

    async def start(self) -> None:
        await self.producer.start()
        await self.consumer.start()
        self.consumer.assign([TopicPartition(self.settings.topics.replies, p) for p in range(self.settings.partitions)])
        self.reader = asyncio.create_task(self._read())

    async def stop(self) -> None:
        self.reader.cancel()
        await asyncio.gather(self.reader, *self.tasks, return_exceptions=True)
        await self.producer.stop()
        await self.consumer.stop()

    async def send(self, command: dict, correlation_id: str | None = None) -> None:
        correlation_id = correlation_id or f"{command['wallet']}/{command['id']}"
        self.ledger.commands[correlation_id] = command
        await self.in_flight.acquire()
        task = asyncio.create_task(self._deliver(command, correlation_id))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _deliver(self, command: dict, correlation_id: str) -> None:
        """Until the broker acknowledges it; a send that failed goes again under the same id."""
        value = json.dumps(command, separators=(",", ":")).encode()
        headers = [("reply_to", self.settings.topics.replies.encode()), ("correlation_id", correlation_id.encode())]
        try:
            while True:
                try:
                    future = await self.producer.send(self.settings.topics.commands, value,
                                                      key=command["wallet"].encode(), headers=headers)  # fmt: skip
                    await future
                    self.ledger.acked.add(correlation_id)
                    return
                except KafkaError:
                    self.ledger.send_retries += 1
                    await asyncio.sleep(SEND_RETRY_PAUSE_S)
        finally:
            self.in_flight.release()

    async def _read(self) -> None:
        while True:
            try:
                batches = await self.consumer.getmany(timeout_ms=100, max_records=10_000)
            except KafkaError:
                await asyncio.sleep(SEND_RETRY_PAUSE_S)
                continue
            for records in batches.values():
                for record in records:
                    correlation_id = dict(record.headers).get("correlation_id", b"").decode()
                    if correlation_id in self.ledger.commands and correlation_id not in self.ledger.replies:
                        reply = json.loads(record.value)
                        self.ledger.replies[correlation_id] = reply
                        self._follow(self.ledger.commands[correlation_id], reply)

    def _follow(self, command: dict, reply: dict) -> None:
        """A hold opened by the load is captured or released once its reserve is answered (once:
        a reserve sent again is answered again, and a second, different follow-up under the same
        id would be refused 409 idempotency_conflict)."""
        if command["op"] != "reserve" or not reply["ok"] or command.get("ttl_ms") == SHORT_HOLD_TTL_MS:
            return
        if (command["wallet"], command["id"]) in self.followed:
            return
        self.followed.add((command["wallet"], command["id"]))
        op = "capture" if self.rng.random() < 0.8 else "release"
        follow = {"v": 1, "op": op, "id": f"{op[0]}-{command['id']}", "wallet": command["wallet"], "hold": reply["hold"]}
        if op == "capture":
            follow["amount"] = self.rng.randint(0, reply["amount"])
        task = asyncio.create_task(self.send(follow))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def open_wallets(self, wallets: list[str]) -> None:
        """Opens and funds every wallet, and waits for each to be decided 200 before the offer
        begins: sends are separate tasks, so a charge offered at once could reach the log ahead of
        its wallet's open (seen once: a 404 `wallet_not_found`, rightly not stored, and the check
        then missed a decision for a command it had acknowledged)."""
        for wallet in wallets:
            await self.send({"v": 1, "op": "open", "id": "open", "wallet": wallet})
        await self._answered([f"{wallet}/open" for wallet in wallets])
        for wallet in wallets:
            await self.send({"v": 1, "op": "credit", "id": "fund", "wallet": wallet, "amount": FUNDS})
        await self._answered([f"{wallet}/fund" for wallet in wallets])

    async def _answered(self, correlation_ids: list[str]) -> None:
        deadline = time.monotonic() + OPEN_TIMEOUT_S
        while any(c not in self.ledger.replies for c in correlation_ids):
            if time.monotonic() >= deadline:
                missing = [c for c in correlation_ids if c not in self.ledger.replies]
                raise RuntimeError(f"{len(missing)} of the setup's commands unanswered after {OPEN_TIMEOUT_S} s, e.g. {missing[:3]}")
            await asyncio.sleep(0.1)
        refused = [c for c in correlation_ids if self.ledger.replies[c]["status"] != 200]
        if refused:
            raise RuntimeError(f"{len(refused)} of the setup's commands refused, e.g. {[self.ledger.replies[c] for c in refused[:3]]}")

    def next_command(self, wallets: list[str]) -> tuple[dict, str | None]:
        """A charge mostly; some reserves (a few left open to expire), credits, and retries."""
        self.count += 1
        kind, wallet = self.rng.random(), self.rng.choice(wallets)
        if kind < 0.05 and self.recent:
            again = self.ledger.commands[self.rng.choice(self.recent)]
            return again, f"{again['wallet']}/{again['id']}/again-{self.count}"  # same command, same id
        command = {"v": 1, "op": "charge", "id": f"c{self.count}", "wallet": wallet,
                   "amount": self.rng.randint(1, AMOUNT_MAX)}  # fmt: skip
        if kind < 0.15:
            command.update(op="reserve", id=f"r{self.count}")
        elif kind < 0.17:
            command.update(op="reserve", id=f"r{self.count}", ttl_ms=SHORT_HOLD_TTL_MS)
        elif kind < 0.20:
            command.update(op="credit", id=f"k{self.count}")
        self.recent = [*self.recent[-(RECENT_MAX - 1):], f"{wallet}/{command['id']}"]
        return command, None

    async def offer(self, wallets: list[str], rate: int, stop: asyncio.Event) -> None:
        started, sent = time.monotonic(), 0
        while not stop.is_set():
            due = int((time.monotonic() - started) * rate) - sent
            for _ in range(max(due, 0)):
                await self.send(*self.next_command(wallets))
                sent += 1
            await asyncio.sleep(0.01)


@dataclass
class Workers:
    settings: config.Settings
    log_dir: Path
    processes: int
    metrics_base: int
    root: Path = ROOT  # where the workers' code is (another checkout, to compare versions)
    supervisor: subprocess.Popen | None = None
    extras: list[subprocess.Popen] = field(default_factory=list)

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, config.ENV_KAFKA_BOOTSTRAP: self.settings.kafka_bootstrap,
                config.ENV_DATABASE_URL: self.settings.database_url,
                config.ENV_TOPIC_PREFIX: self.settings.topics.prefix, config.ENV_GROUP_ID: self.settings.group_id,
                **extra}  # fmt: skip

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.supervisor = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "worker", "--processes", str(self.processes)], cwd=self.root,
            env=self.env(**{config.ENV_METRICS_PORT: str(self.metrics_base)}),
            stdout=(self.log_dir / "supervised.log").open("wb"), stderr=subprocess.STDOUT)  # fmt: skip

    def extra(self, **env: str) -> subprocess.Popen:
        log = (self.log_dir / f"extra-{len(self.extras)}.log").open("wb")
        process = subprocess.Popen([sys.executable, "-m", "worker.cli", "worker"], cwd=self.root,
                                   env=self.env(**{config.ENV_METRICS_PORT: "0"}, **env),
                                   stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        self.extras.append(process)
        return process

    def supervised(self) -> list[int]:
        """The supervisor's live worker processes."""
        assert self.supervisor is not None
        found = []
        for entry in Path("/proc").glob("[0-9]*"):
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[1]) == self.supervisor.pid and fields[0] != "Z":
                found.append(int(entry.name))
        return found

    def ports(self) -> list[int]:
        return [self.metrics_base + index for index in range(self.processes)]

    def stop(self) -> None:
        running = [p for p in [self.supervisor, *self.extras] if p is not None and p.poll() is None]
        for pid in self.supervised():
            _signal(pid, signal.SIGCONT)  # a stalled worker must hear the SIGTERM
        for process in running:
            process.send_signal(signal.SIGTERM)
        for process in running:
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def scrape(port: int) -> dict[str, float]:
    """The worker's /metrics as {name: value}, for the few unlabelled series read here."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=HTTP_TIMEOUT_S) as response:
            text = response.read().decode()
    except OSError:
        return {}
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, _, value = line.partition(" ")
            values[name] = float(value)
    return values



# --- faults ---------------------------------------------------------------------------------------


class Faults:
    def __init__(self, workers: Workers, rng: random.Random, args: argparse.Namespace) -> None:
        self.workers, self.rng, self.args = workers, rng, args
        self.injected: Counter = Counter()
        self.log: list[dict] = []
        self.outages: list[dict] = []
        self.stuck: list[int] = []  # workers that did not stop within STOP_WAIT_S of a SIGTERM
        self.started = time.monotonic()

    def note(self, kind: str, **detail) -> None:
        self.injected[kind] += 1
        self.log.append({"at_s": round(time.monotonic() - self.started, 1), "kind": kind, **detail})
        print(f"chaos: {self.log[-1]}", file=sys.stderr, flush=True)

    async def run(self, kind: str) -> None:
        await getattr(self, kind)()

    async def kill(self) -> None:
        pids = self.workers.supervised()
        if pids:
            victim = self.rng.choice(pids)
            _signal(victim, signal.SIGKILL)
            self.note("kill", pid=victim)

    async def failpoint(self) -> None:
        commits = self.rng.randint(2, 20)
        process = self.workers.extra(FLOORGUARD_FAILPOINT=f"after_commit:{commits}")
        try:
            code = await asyncio.wait_for(asyncio.to_thread(process.wait), FAILPOINT_WAIT_S)
        except asyncio.TimeoutError:
            process.send_signal(signal.SIGTERM)  # never reached its K-th commit (no partition)
            code = await asyncio.to_thread(process.wait, 60)
        if code == -signal.SIGKILL:
            self.note("failpoint", commits=commits)
        else:
            self.note("join", note=f"failpoint after_commit:{commits} not reached, left with {code}")

    async def join(self) -> None:
        process = self.workers.extra()
        stay_s = self.rng.uniform(3, 10)
        await asyncio.sleep(stay_s)
        process.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.to_thread(process.wait, STOP_WAIT_S)
        except subprocess.TimeoutExpired:  # seen once: a worker that did not stop on SIGTERM
            self.stuck.append(process.pid)
            process.kill()
            code = await asyncio.to_thread(process.wait)
        self.note("join", stayed_s=round(stay_s, 1), exit=code)

    async def stall(self) -> None:
        pids = self.workers.supervised()
        if not pids:
            return
        victim = self.rng.choice(pids)
        _signal(victim, signal.SIGSTOP)
        await asyncio.sleep(STALL_S)
        _signal(victim, signal.SIGCONT)
        self.note("stall", pid=victim, frozen_s=STALL_S)

    async def kafka(self) -> None:
        down_s = self.rng.uniform(self.args.outage_s / 3, self.args.outage_s / 2)
        began = time.monotonic()
        await asyncio.to_thread(kafka.down, stack.home())
        await asyncio.sleep(down_s)
        await asyncio.to_thread(kafka.up, stack.home())
        self.note("kafka", down_s=round(down_s, 1), unavailable_s=round(time.monotonic() - began, 1))

    async def postgres(self) -> None:
        down_s = self.args.outage_s
        ports = self.workers.ports()
        before = [await asyncio.to_thread(scrape, port) for port in ports]
        rss_before = [resident_size_mib(pid) for pid in self.workers.supervised()]
        began = time.monotonic()
        await asyncio.to_thread(postgres.down, stack.home())
        stopped = time.monotonic()
        samples = []
        while time.monotonic() - stopped < down_s:
            pids = self.workers.supervised()
            states = [await asyncio.to_thread(health, port) for port in ports]
            samples.append({"at_s": round(time.monotonic() - stopped, 1),
                            "rss_mib": [resident_size_mib(pid) for pid in pids],
                            "fetched": [(await asyncio.to_thread(scrape, port)).get(FETCHED) for port in ports],
                            "unreachable_s": [s and s.get("database_unreachable_s") for s in states]})  # fmt: skip
            await asyncio.sleep(SAMPLE_EVERY_S)
        await asyncio.to_thread(postgres.up, stack.home())
        after = [await asyncio.to_thread(scrape, port) for port in ports]
        rss = [mib for sample in samples for mib in sample["rss_mib"] if mib is not None]
        self.outages.append({
            "down_s": round(time.monotonic() - began, 1), "samples": samples,
            "rss_mib_before": rss_before, "rss_mib_max": max(rss, default=None),
            "records_fetched_while_down": _fetched_while_down(samples),
            "records_fetched_across": [a.get(FETCHED, 0) - b.get(FETCHED, 0) for a, b in zip(after, before, strict=True)],
        })  # fmt: skip
        self.note("postgres", down_s=round(time.monotonic() - began, 1), rss_mib_max=max(rss, default=None))


def _fetched_while_down(samples: list[dict]) -> list[float | None]:
    """Per worker, records its consumer handed over from the first sample to the last (the
    database down all along); None when a worker's counter was not readable or restarted."""
    first, last = samples[0]["fetched"], samples[-1]["fetched"]
    return [b - a if a is not None and b is not None and b >= a else None for a, b in zip(first, last, strict=True)]


def schedule(rng: random.Random, kinds: list[str], seconds: float, gap_s: tuple[float, float]) -> list[str]:
    """Every kind at least once, in a random order, then random kinds until the time is spent."""
    planned = rng.sample(kinds, len(kinds))
    while len(planned) * sum(gap_s) / 2 < seconds:
        planned.append(rng.choice(kinds))
    return planned


# --- checks ---------------------------------------------------------------------------------------


async def wait_for_replies(ledger: Ledger, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not ledger.acked <= ledger.replies.keys():
        await asyncio.sleep(0.5)


async def settled(database_url: str, timeout_s: float) -> None:
    """Until the outbox is empty and no hold is open a few seconds past its expiry (the sweepers)."""
    connection = await asyncpg.connect(database_url)
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            left = await connection.fetchval(
                "SELECT (SELECT count(*) FROM outbox) + (SELECT count(*) FROM holds WHERE open AND "
                "expires_at_ms < (extract(epoch FROM now()) * 1000)::bigint - 5000)")  # fmt: skip
            if left == 0:
                return
            await asyncio.sleep(1)
    finally:
        await connection.close()


async def outbox_left(connection: asyncpg.Connection) -> int:
    """Outbox rows still there OUTBOX_GRACE_S after the check first saw them. A row seen once may be
    one a worker has just written and is publishing: a hold that expired after `settled` returned
    is decided (the sweeper's expire) while the check runs, and its row is deleted within a tend."""
    seen = {row["position"] for row in await connection.fetch("SELECT position FROM outbox")}
    deadline = time.monotonic() + OUTBOX_GRACE_S
    while seen and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        seen &= {row["position"] for row in await connection.fetch("SELECT position FROM outbox")}
    return len(seen)


async def check(settings: config.Settings, ledger: Ledger) -> tuple[dict, list[str]]:
    violations: list[str] = []
    connection = await asyncpg.connect(settings.database_url)
    try:
        stored = {(r["wallet"], r["id"]): r for r in await connection.fetch(
            "SELECT wallet, id, count(*) OVER (PARTITION BY wallet, id) AS copies, reply FROM decisions")}  # fmt: skip
        wallets = {r["wallet"]: dict(r) for r in await connection.fetch("SELECT * FROM wallets")}
        below = await connection.fetchval("SELECT count(*) FROM wallets WHERE balance - reserved < floor")
        off_books = await connection.fetch(
            "SELECT wallet FROM wallets AS w WHERE balance <> (SELECT coalesce(sum(CASE WHEN op = 'credit' "
            "THEN amount ELSE -amount END), 0) FROM decisions AS d WHERE d.wallet = w.wallet AND status = 200 "
            "AND op IN ('credit', 'charge', 'capture'))")  # fmt: skip
        open_late = await connection.fetchval(
            "SELECT count(*) FROM holds WHERE open AND expires_at_ms < (extract(epoch FROM now()) * 1000)::bigint - 5000")
        outbox = await outbox_left(connection)
        expires = await connection.fetchval("SELECT count(*) FROM decisions WHERE op = 'expire' AND status = 200")
        decisions = await connection.fetchval("SELECT count(*) FROM decisions")
    finally:
        await connection.close()
    twice = sum(1 for row in stored.values() if row["copies"] > 1)
    if twice:
        violations.append(f"{twice} command ids with more than one decision")
    sent_ids = {(c["wallet"], c["id"]) for c in ledger.commands.values()}
    # a refusal the contract does not store (401, 422 invalid_command or unknown_model, 403, 404
    # wallet_not_found, 409 idempotency_conflict, 409 hold_not_expired) has no decision to match; the load sends none of them, so each is a violation of its own
    unstored = {k: r for k, r in ledger.replies.items() if r["error"] in UNSTORED_ERRORS}
    if unstored:
        violations.append(f"{len(unstored)} refusals that are never stored, e.g. {list(unstored.items())[:3]}")
    unstored_ids = {(r.get("wallet"), r.get("id")) for r in unstored.values()}
    acked_ids = {(ledger.commands[k]["wallet"], ledger.commands[k]["id"]) for k in ledger.acked}
    undecided = acked_ids - stored.keys() - unstored_ids
    if undecided:
        violations.append(f"{len(undecided)} commands sent and acknowledged without a decision, e.g. {sorted(undecided)[:3]}")
    unanswered = ledger.acked - ledger.replies.keys()
    if unanswered:
        violations.append(f"{len(unanswered)} sends without a reply, e.g. {sorted(unanswered)[:3]}")
    differing = [k for k, reply in ledger.replies.items()
                 if k not in unstored and (key := (reply.get("wallet"), reply.get("id"))) in stored
                 and json.loads(stored[key]["reply"]) != {**reply, "duplicate": False}]  # fmt: skip
    if differing:
        violations.append(f"{len(differing)} replies differ from their stored decision, e.g. {differing[:3]}")
    if below:
        violations.append(f"{below} wallets below their floor")
    if off_books:
        violations.append(f"{len(off_books)} wallets whose balance is not their accepted moves")
    by_replies = dict.fromkeys(wallets, 0)
    for (wallet, _), reply in {(r["wallet"], r["id"]): r for r in ledger.replies.values()}.items():
        if reply["ok"] and reply["op"] in ("credit", "charge", "capture"):
            by_replies[wallet] += reply["amount"] if reply["op"] == "credit" else -reply["amount"]
    told = [w for w in wallets if by_replies[w] != wallets[w]["balance"]]
    if told:
        violations.append(f"{len(told)} wallets whose balance is not the accepted moves their replies tell, e.g. {told[:3]}")
    if open_late:
        violations.append(f"{open_late} holds open more than 5 s past their expiry: a sweeper stopped")
    if outbox:
        violations.append(f"{outbox} outbox records never published")
    counts = {"commands_sent": len(sent_ids), "sends": len(ledger.commands), "sends_acknowledged": len(ledger.acked),
              "send_retries": ledger.send_retries, "replies": len(ledger.replies), "decisions": decisions,
              "sweeper_expires": expires, "wallets": len(wallets)}  # fmt: skip
    return counts, violations


def audit(workers: Workers) -> tuple[int, str]:
    done = subprocess.run([sys.executable, "-m", "worker.cli", "audit"], cwd=ROOT, env=workers.env(),
                          capture_output=True, text=True, timeout=AUDIT_TIMEOUT_S)  # fmt: skip
    return done.returncode, done.stdout.strip()


def log_counts(log_dir: Path) -> dict[str, int]:
    """What the workers' logs say happened: restarts, fenced batches, outages (one line each)."""
    text = "".join(path.read_text(errors="replace") for path in log_dir.glob("*.log"))
    return {"worker_restarts": text.count("exited with"), "fenced_batches": text.count(" fenced ("),
            "database_unreachable_lines": text.count("database unreachable"),
            "database_back_lines": text.count("database answers again"),
            "outbox_healed": text.count("records left in the outbox"),
            "tracebacks": text.count("Traceback")}  # fmt: skip


# --- the run --------------------------------------------------------------------------------------


async def main(args: argparse.Namespace) -> dict:
    seed = args.seed if args.seed is not None else random.randrange(1_000_000)
    print(f"chaos: seed {seed}", file=sys.stderr, flush=True)
    rng = random.Random(seed)
    endpoints = await asyncio.to_thread(stack.up)
    current = config.Settings(endpoints.kafka_bootstrap, endpoints.database_url, config.Topics("unused"), "", 0)
    settings, database = await setup(args, current)
    workers = Workers(settings, Path(args.logs), args.workers, args.metrics_port, Path(args.worker_root))
    ledger = Ledger()
    load = Load(settings, ledger, rng)
    faults = Faults(workers, rng, args)
    kinds = [k for k in args.faults.split(",") if k]
    assert set(kinds) <= set(KINDS), kinds
    began = time.monotonic()
    violations: list[str] = []
    try:
        workers.start()
        await load.start()
        await shared_out(workers.ports(), settings.partitions)
        wallets = [f"w{i}" for i in range(args.wallets)]
        await load.open_wallets(wallets)
        stop = asyncio.Event()
        offer = asyncio.create_task(load.offer(wallets, args.rate, stop))
        for kind in schedule(rng, kinds, args.seconds, (args.gap_min_s, args.gap_max_s)):
            await asyncio.sleep(rng.uniform(args.gap_min_s, args.gap_max_s))
            await faults.run(kind)
            if offer.done():
                break
        await asyncio.sleep(SETTLE_S)
        stop.set()
        await offer
        faulted_s = time.monotonic() - began
        await asyncio.to_thread(stack.up)  # whatever a fault left down
        await wait_for_replies(ledger, DRAIN_TIMEOUT_S)
        await settled(settings.database_url, DRAIN_TIMEOUT_S)
        counts, found = await check(settings, ledger)
        violations += found
        try:  # the supervised workers, restarted or thawed, each decide a share again
            await shared_out(workers.ports(), settings.partitions)
        except RuntimeError as error:
            violations.append(f"after the faults: {error}")
        violations += [f"worker pid {pid} did not stop within {STOP_WAIT_S} s of SIGTERM" for pid in faults.stuck]
        code, line = await asyncio.to_thread(audit, workers)
        if code != 0:
            violations.append(f"floorguard audit exited {code}: {line}")
    finally:
        await load.stop()
        await asyncio.to_thread(workers.stop)
        if not args.keep and not violations:
            admin = await asyncpg.connect(current.database_url)
            await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
            await admin.close()
            await delete_topics(current.kafka_bootstrap, settings.topics)
    return {
        "seed": seed, "machine_cores": os.cpu_count(), "workers": args.workers, "partitions": args.partitions,
        "rate_per_s": args.rate, "duration_s": round(time.monotonic() - began, 1), "faulted_s": round(faulted_s, 1),
        "faults": dict(faults.injected), **counts, "audit": line, "logs": log_counts(Path(args.logs)),
        "postgres_outages": [{k: v for k, v in o.items() if k != "samples"} for o in faults.outages],
        "violations": violations, "ok": not violations, "fault_log": faults.log,
        "outage_samples": [o["samples"] for o in faults.outages],
        "kept": None if not violations and not args.keep else {"database": database, "prefix": settings.topics.prefix},
    }  # fmt: skip


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=300, help="how long faults keep coming")
    parser.add_argument("--rate", type=int, default=300, help="commands offered per second")
    parser.add_argument("--workers", type=int, default=2, help="supervised worker processes")
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--wallets", type=int, default=200)
    parser.add_argument("--faults", default=",".join(KINDS), help=f"kinds to inject, of {','.join(KINDS)}")
    parser.add_argument("--gap-min-s", type=float, default=5, help="pause before a fault, at least")
    parser.add_argument("--gap-max-s", type=float, default=20, help="pause before a fault, at most")
    parser.add_argument("--outage-s", type=float, default=30, help="PostgreSQL stays down this long (Kafka a third to a half)")
    parser.add_argument("--seed", type=int, help="random when not given; printed either way")
    parser.add_argument("--metrics-port", type=int, default=19464, help="first worker's /metrics port")
    parser.add_argument("--logs", default=str(ROOT / ".floorguard" / "chaos-logs"))
    parser.add_argument("--worker-root", default=str(ROOT), help="run the workers from this checkout")
    parser.add_argument("--keep", action="store_true", help="keep the database and topics (kept anyway on a violation)")
    parser.add_argument("--out", help="write the JSON summary here too")
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments_ = arguments()
    for old in Path(arguments_.logs).glob("*.log"):
        old.unlink()
    result = asyncio.run(main(arguments_))
    if arguments_.out:
        Path(arguments_.out).parent.mkdir(parents=True, exist_ok=True)
        Path(arguments_.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("fault_log", "outage_samples")}, indent=1))
    sys.exit(0 if result["ok"] else 1)
