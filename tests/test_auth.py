"""Authentication and authority (the contract's Security section): the core's rules first, then the
real worker, CLI and client against the real Kafka and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from dataclasses import replace

import asyncpg
import pytest
from hypothesis import given, settings as hypothesis_settings, strategies as st

from floorguard import Forbidden, Ledger, Unauthenticated
from tests.conftest import ROOT, worker_env
from worker.core.auth import (
    SWEEPER_KEY_ID,
    Authority,
    Key,
    Scope,
    auth_header,
    derive_secret,
    secret_deriver,
)
from worker.core.decide import decide_batch
from worker.core.model import PartitionState, Record, Wallet
from worker.core.parse import parse

MASTER = b"test-master-secret-that-is-long-enough-0123456789"
T0_MS = 1_700_000_000_000
REPLY_TO = ("reply_to", b"replies")


# --- the core ---------------------------------------------------------------------------------


def _keys(*keys: Key) -> dict[str, Key]:
    return {key.key_id: key for key in keys}


ADMIN = Key("admin-1", Scope.ADMIN, None, T0_MS, None)
SPEND_A = Key("spend-a", Scope.WALLET, "a", T0_MS, None)
SWEEPER = Key(SWEEPER_KEY_ID, Scope.EXPIRE, None, T0_MS, None)
REVOKED = Key("gone", Scope.ADMIN, None, T0_MS, T0_MS + 500)
LATER = Key("later", Scope.ADMIN, None, T0_MS + 500, None)
ALL_KEYS = _keys(ADMIN, SPEND_A, SWEEPER, REVOKED, LATER)


def _state(modes=((T0_MS, True),), keys=ALL_KEYS) -> PartitionState:
    state = PartitionState(0, 0, authority=Authority(modes, keys, secret_deriver(MASTER)))
    for name in ("a", "b"):
        state.wallets[name] = Wallet(name, balance=100, reserved=0, floor=0, seq=1, partition=0)
    return state


def _record(command: dict, key_id: str | None = "admin-1", *, at_ms: int = T0_MS + 100, wallet: str | None = None,
            signed_value: bytes | None = None, headers: tuple = (REPLY_TO,), offset: int = 0) -> Record:  # fmt: skip
    value = json.dumps(command).encode()
    extra = ()
    if key_id is not None:
        extra = (auth_header(key_id, derive_secret(MASTER, key_id), signed_value or value),)
    key = (wallet or command.get("wallet", "a")).encode()
    return Record(0, offset, at_ms, key, value, (*headers, *extra))


def _decide(record: Record, state: PartitionState | None = None):
    state = state or _state()
    return decide_batch(state, [parse(record, ("commands", "events", "dlq"))])[0]


def charge(wallet: str = "a", amount: int = 5, **extra) -> dict:
    return {"v": 1, "op": "charge", "id": uuid.uuid4().hex, "wallet": wallet, "amount": amount, **extra}


def test_a_spend_key_charges_its_own_wallet():
    decision = _decide(_record(charge(), "spend-a"))
    assert decision.stored and decision.reply["ok"], decision.reply
    assert decision.reply["balance"] == 95


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (_record(charge(), None), "auth: missing"),
        (_record(charge(), "nobody"), "auth: unknown key"),
        (_record(charge(), "spend-a", signed_value=b"{}"), "auth: signature does not match the value"),
        (_record(charge(), "gone", at_ms=T0_MS + 500), "auth: key revoked"),
        (_record(charge(), "later", at_ms=T0_MS + 499), "auth: key not valid yet"),
        (Record(0, 0, T0_MS + 1, b"a", json.dumps(charge()).encode(), (REPLY_TO, ("auth", b"spend-a"))),
         "auth: must be <key_id>.<signature>"),  # fmt: skip
        (Record(0, 0, T0_MS + 1, b"a", json.dumps(charge()).encode(), (REPLY_TO, ("auth", b"spend-a." + b"A" * 64))),
         "auth: signature must be 64 lowercase hex digits"),  # fmt: skip
        (Record(0, 0, T0_MS + 1, b"a", b"{}", (REPLY_TO, ("auth", b"\xff"))), "auth: not ASCII"),
        (Record(0, 0, T0_MS + 1, b"a", b"{}", (REPLY_TO, ("auth", b"x.y"), ("auth", b"x.y"))), "auth: header repeated"),
    ],
)
def test_unauthenticated_is_401_unstored_and_shows_no_balance(record, message):
    decision = _decide(record)
    assert (decision.reply["status"], decision.reply["error"], decision.reply["message"]) == (401, "unauthenticated", message)
    assert not decision.stored
    assert "balance" not in decision.reply and "available" not in decision.reply


def test_a_revoked_key_signed_before_its_revocation_still_counts():
    """Times are the command's (broker time), so a replay decides exactly the same."""
    assert _decide(_record(charge(), "gone", at_ms=T0_MS + 499)).reply["ok"]


@pytest.mark.parametrize(
    ("command", "key_id", "message"),
    [
        ({"v": 1, "op": "credit", "id": "c1", "wallet": "a", "amount": 1}, "spend-a", "a spend key may not credit"),
        ({"v": 1, "op": "open", "id": "o1", "wallet": "c"}, "spend-a", "a spend key may not open"),
        ({"v": 1, "op": "expire", "id": "expire:h", "wallet": "a", "hold": "h"}, "spend-a", "a spend key may not expire"),
        (charge("b"), "spend-a", "a spend key may only spend from its own wallet"),
        (charge("a"), SWEEPER_KEY_ID, "this key may only expire holds, not charge"),
        ({"v": 1, "op": "credit", "id": "c2", "wallet": "a", "amount": 1}, SWEEPER_KEY_ID,
         "this key may only expire holds, not credit"),  # fmt: skip
    ],
)
def test_out_of_scope_is_403_unstored(command, key_id, message):
    decision = _decide(_record(command, key_id))
    assert (decision.reply["status"], decision.reply["error"], decision.reply["message"]) == (403, "forbidden", message)
    assert not decision.stored and "balance" not in decision.reply


def test_admin_keys_do_everything_and_the_sweeper_key_expires():
    state = _state()
    for command in ({"v": 1, "op": "open", "id": "o", "wallet": "c"},
                    {"v": 1, "op": "credit", "id": "c", "wallet": "c", "amount": 10}, charge("c", 3)):  # fmt: skip
        assert _decide(_record(command, "admin-1"), state).reply["ok"]
    reserve = {"v": 1, "op": "reserve", "id": "h1", "wallet": "a", "amount": 10, "ttl_ms": 1}
    assert _decide(_record(reserve, "spend-a"), state).reply["ok"]
    expire = {"v": 1, "op": "expire", "id": "expire:h1", "wallet": "a", "hold": "h1"}
    assert _decide(_record(expire, SWEEPER_KEY_ID, at_ms=T0_MS + 200), state).reply["ok"]


def test_precedence_401_then_422_then_403():
    bad = {"v": 1, "op": "credit", "id": "c", "wallet": "a", "amount": 1.5}
    assert _decide(_record(bad, None)).reply["status"] == 401  # 401 before 422
    assert _decide(_record(bad, "spend-a")).reply["status"] == 422  # 422 before 403
    assert _decide(_record({**bad, "amount": 1}, "spend-a")).reply["status"] == 403
    missing_wallet = charge("nowhere")
    assert _decide(_record(missing_wallet, "spend-a")).reply["status"] == 403  # 403 before 404


def test_refusals_without_a_reply_address_go_to_the_dead_letter_topic():
    from worker.core.outgoing import outgoing

    for record, reason in ((_record(charge(), None, headers=()), b"unauthenticated: auth: missing"),
                           (_record(charge("b"), "spend-a", headers=()), b"forbidden: a spend key may only")):  # fmt: skip
        decision = _decide(record)
        [dead] = outgoing(decision, "events", "dlq", "commands")
        assert dead.topic == "dlq" and dict(dead.headers)["reason"].startswith(reason)


def test_authentication_applies_from_its_mode_s_time_on():
    modes = ((T0_MS + 1_000, True), (T0_MS + 2_000, False))
    assert _decide(_record(charge(), None, at_ms=T0_MS + 999), _state(modes)).reply["ok"]
    assert _decide(_record(charge(), None, at_ms=T0_MS + 1_000), _state(modes)).reply["status"] == 401
    assert _decide(_record(charge(), None, at_ms=T0_MS + 2_000), _state(modes)).reply["ok"]


@hypothesis_settings(max_examples=300, deadline=None)
@given(
    value=st.binary(max_size=300),
    auth=st.one_of(st.none(), st.binary(max_size=100), st.sampled_from(list(ALL_KEYS)).map(lambda k: k.encode())),
    tamper=st.booleans(),
)
def test_nothing_unsigned_or_tampered_is_ever_stored(value, auth, tamper):
    """Whatever the bytes, a record is stored only when a valid key signed exactly those bytes."""
    headers: tuple = (REPLY_TO,)
    if auth is not None:
        key_id = auth.decode(errors="replace")
        if key_id in ALL_KEYS:
            signed = auth_header(key_id, derive_secret(MASTER, key_id), value + (b" " if tamper else b""))
            headers = (*headers, signed)
        else:
            headers = (*headers, ("auth", auth))
    decision = _decide(Record(0, 0, T0_MS + 100, b"a", value, headers))
    if decision.stored:
        assert auth is not None and not tamper and auth.decode() in ("admin-1", "spend-a")


def test_secrets_are_derived_per_key_and_never_equal_the_master():
    one, two = derive_secret(MASTER, "k1"), derive_secret(MASTER, "k2")
    assert one != two and one.startswith("fgs_") and MASTER.decode() not in one
    assert derive_secret(MASTER + b"x", "k1") != one
    assert "master" not in repr(replace(_state().authority, keys={}))  # the master is in no field


# --- the real worker --------------------------------------------------------------------------


def _cli(settings, *args: str, key: str | None = None, master: bytes | None = MASTER) -> subprocess.CompletedProcess:
    env = worker_env(settings)
    env.pop("FLOORGUARD_MASTER_SECRET_FILE", None)
    if master is not None:
        env["FLOORGUARD_MASTER_SECRET"] = master.decode()
    if key is not None:
        env["FLOORGUARD_KEY"] = key
    return subprocess.run([sys.executable, "-m", "worker.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def _create_key(settings, *scope: str) -> str:
    done = _cli(settings, "key", "create", *scope, "--json")
    assert done.returncode == 0, done.stderr
    made = json.loads(done.stdout)
    return f"{made['key_id']}:{made['secret']}"


def _ledger(settings, key: str | None) -> Ledger:
    return Ledger(settings.kafka_bootstrap, topic_prefix=settings.topics.prefix, timeout_s=20, key=key)


async def _serving(ledger: Ledger) -> None:
    probe = {"v": 1, "op": "charge", "id": uuid.uuid4().hex, "wallet": "ready-probe", "amount": 1}
    reply = await asyncio.wait_for(ledger.send(probe, raise_on_refusal=False), 60)
    assert reply.status in (401, 404), reply


@pytest.fixture
def auth_env() -> dict[str, str]:
    return {"FLOORGUARD_AUTH": "required", "FLOORGUARD_MASTER_SECRET": MASTER.decode()}


async def test_the_worker_enforces_keys_end_to_end(settings, workers, auth_env, tmp_path):
    process = workers.start(**auth_env, FLOORGUARD_SWEEP_INTERVAL_MS="100")
    admin = _create_key(settings, "--admin")
    spend = _create_key(settings, "--wallet", "agent-1")
    async with _ledger(settings, admin) as operator, _ledger(settings, spend) as agent, \
            _ledger(settings, None) as stranger:  # fmt: skip
        await _serving(operator)
        await operator.open("agent-1")
        await operator.open("agent-2")
        await operator.credit("agent-1", 1_000)
        await operator.credit("agent-2", 1_000)

        # The agent spends its own money, and only that.
        assert (await agent.charge("agent-1", 100)).balance == 900
        with pytest.raises(Forbidden, match="may not credit"):
            await agent.credit("agent-1", 1_000_000)
        with pytest.raises(Forbidden, match="own wallet"):
            await agent.charge("agent-2", 100)
        with pytest.raises(Unauthenticated, match="auth: missing"):
            await stranger.charge("agent-1", 100)
        forged = _ledger(settings, spend.split(":")[0] + ":fgs_" + "0" * 64)
        async with forged:
            with pytest.raises(Unauthenticated, match="signature does not match"):
                await forged.charge("agent-1", 100)

        # A signed record sent twice is still one decision.
        first = await agent.charge("agent-1", 10, id="twice")
        again = await agent.charge("agent-1", 10, id="twice")
        assert again.duplicate and again.seq == first.seq and again.balance == first.balance

        # The sweeper's own key expires holds (and can do nothing else).
        hold = await agent.reserve("agent-1", 50, ttl_ms=200)
        for _ in range(100):
            wallet = await _wallet(settings, "agent-1")
            if wallet["reserved"] == 0:
                break
            await asyncio.sleep(0.1)
        assert wallet["reserved"] == 0, f"hold {hold.hold} never expired"

        # Revoked: the very next command is refused.
        key_id = spend.split(":")[0]
        done = _cli(settings, "key", "revoke", key_id)
        assert done.returncode == 0, done.stderr
        with pytest.raises(Unauthenticated, match="key revoked"):
            await agent.charge("agent-1", 1)
        listed = [json.loads(line) for line in _cli(settings, "key", "list", "--json").stdout.splitlines()]
        assert {row["key_id"]: row["revoked_at"] is not None for row in listed}[key_id]

    # Nothing refused was stored, nothing moved but the accepted charges.
    connection = await asyncpg.connect(settings.database_url)
    try:
        assert await connection.fetchval("SELECT balance FROM wallets WHERE wallet = 'agent-1'") == 890
        assert await connection.fetchval("SELECT balance FROM wallets WHERE wallet = 'agent-2'") == 1_000
        statuses = {row[0] for row in await connection.fetch("SELECT DISTINCT status FROM decisions")}
        assert statuses == {200}, statuses
        # No secret in the database: every text of every auth table, searched for the secrets.
        dumped = json.dumps([dict(row) for table in ("auth_keys", "auth_settings", "auth_modes")
                             for row in await connection.fetch(f"SELECT * FROM {table}")], default=str)  # fmt: skip
    finally:
        await connection.close()
    for secret in (MASTER.decode(), admin.split(":")[1], spend.split(":")[1]):
        assert secret not in dumped
    workers.stop_all()
    log = (tmp_path / "worker-0.log").read_text()
    assert process.returncode == 0, log[-2000:]
    for secret in (MASTER.decode(), admin.split(":")[1], spend.split(":")[1]):
        assert secret not in log


async def _wallet(settings, wallet: str) -> dict:
    connection = await asyncpg.connect(settings.database_url)
    try:
        return dict(await connection.fetchrow("SELECT * FROM wallets WHERE wallet = $1", wallet))
    finally:
        await connection.close()


async def test_a_worker_refuses_to_start_unsafely(settings, workers, auth_env):
    """Required mode without a master secret, a worker with auth off on a ledger that requires it,
    and a master secret other than the ledger's: each stops at once with exit 2, naming why."""
    for env in ({"FLOORGUARD_AUTH": "required"}, {"FLOORGUARD_AUTH": "maybe"}):
        assert workers.start(**env).wait(timeout=60) == 2
    assert _cli(settings, "auth", "required").returncode == 0
    assert _cli(settings, "auth", "status").stdout.strip() == "required"
    off = workers.start()
    assert off.wait(timeout=60) == 2
    wrong = workers.start(**{**auth_env, "FLOORGUARD_MASTER_SECRET": "another-master-secret-of-enough-length-000"})
    assert wrong.wait(timeout=60) == 2
    logs = [(workers.log_dir / f"worker-{i}.log").read_text() for i in range(4)]
    for log, expected in zip(logs, ("needs the master secret", "must be one of off, required",
                                    "this ledger requires authentication", "not the one the ledger's keys"),
                             strict=True):  # fmt: skip
        assert expected in log, log[-1000:]
    assert _cli(settings, "auth", "off").returncode == 0
    assert _cli(settings, "auth", "status").stdout.strip() == "off"


async def test_replay_of_a_signed_log_needs_the_master_and_decides_the_same(settings, workers, auth_env, tmp_path,
                                                                            services):  # fmt: skip
    workers.start(**auth_env)
    admin = _create_key(settings, "--admin")
    spend = _create_key(settings, "--wallet", "w")
    async with _ledger(settings, admin) as operator, _ledger(settings, spend) as agent, \
            _ledger(settings, None) as stranger:  # fmt: skip
        await _serving(operator)
        await operator.open("w")
        await operator.credit("w", 100)
        await agent.charge("w", 30)
        with pytest.raises(Forbidden):
            await agent.credit("w", 1_000)
        with pytest.raises(Unauthenticated):
            await stranger.credit("w", 1_000)
        _cli(settings, "key", "revoke", spend.split(":")[0])
        with pytest.raises(Unauthenticated):
            await agent.charge("w", 30)
        await operator.charge("w", 1)
    target = f"floorguard_replay_{uuid.uuid4().hex[:10]}"
    admin_connection = await asyncpg.connect(services.database_url)
    await admin_connection.execute(f'CREATE DATABASE "{target}"')
    try:
        target_url = settings.database_url.rsplit("/", 1)[0] + "/" + target
        refused = _cli(settings, "replay", "--into", target_url, master=None)
        assert refused.returncode == 2 and "master secret" in refused.stderr, refused.stderr
        await admin_connection.execute(f'DROP DATABASE "{target}" WITH (FORCE)')
        await admin_connection.execute(f'CREATE DATABASE "{target}"')
        done = _cli(settings, "replay", "--into", target_url, "--verify")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "identical" in done.stdout
        rebuilt = await asyncpg.connect(target_url)
        try:
            assert await rebuilt.fetchval("SELECT balance FROM wallets WHERE wallet = 'w'") == 69
        finally:
            await rebuilt.close()
    finally:
        await admin_connection.execute(f'DROP DATABASE IF EXISTS "{target}" WITH (FORCE)')
        await admin_connection.close()


IMPOSTOR_RECORDS = 5_000


async def test_thousands_of_impostors_change_nothing(settings, workers, auth_env):
    """A prompt-injected agent and a stranger try everything at once: unsigned commands, forged and
    tampered signatures, garbage headers, a spend key topping itself up, opening wallets and
    spending from its neighbour's. Each gets its 401 or 403 (or a dead letter without a reply
    address); not one is stored; the ledger is exactly as before; honest traffic goes on."""
    import random

    from aiokafka import AIOKafkaProducer

    from tests.harness import Replies

    workers.start(**auth_env)
    admin = _create_key(settings, "--admin")
    spend = _create_key(settings, "--wallet", "victim-agent")
    spend_id, spend_secret = spend.split(":")
    async with _ledger(settings, admin) as operator:
        await _serving(operator)
        for wallet in ("victim-agent", "neighbour"):
            await operator.open(wallet)
            await operator.credit(wallet, 1_000_000)
    before = await _books(settings)

    rng = random.Random(7)
    attempts: list[tuple[bytes, bytes, list, int]] = []  # key, value, headers, expected status
    for n in range(IMPOSTOR_RECORDS):
        kind = rng.choice(("unsigned", "forged", "tampered", "garbage", "credit", "open", "neighbour", "expire"))
        wallet = "neighbour" if kind == "neighbour" else "victim-agent"
        command = {"v": 1, "op": "charge", "id": f"imp-{n}", "wallet": wallet, "amount": rng.randint(1, 10**6)}
        if kind == "credit":
            command = {"v": 1, "op": "credit", "id": f"imp-{n}", "wallet": wallet, "amount": 10**9}
        elif kind == "open":
            command = {"v": 1, "op": "open", "id": f"imp-{n}", "wallet": f"new-{n}"}
        elif kind == "expire":
            command = {"v": 1, "op": "expire", "id": f"expire:h{n}", "wallet": wallet, "hold": f"h{n}"}
        value = json.dumps(command).encode()
        headers: list = [("correlation_id", f"imp-{n}".encode())]
        if rng.random() < 0.9:
            headers.append(("reply_to", settings.topics.replies.encode()))
        status = 401
        if kind == "forged":
            headers.append(auth_header(spend_id, "fgs_" + "%064x" % rng.getrandbits(256), value))
        elif kind == "tampered":
            headers.append(auth_header(spend_id, spend_secret, value.replace(b'"amount": ', b'"amount": 1')))
        elif kind == "garbage":
            headers.append(("auth", rng.randbytes(rng.randint(0, 80))))
        elif kind in ("credit", "open", "neighbour", "expire"):
            headers.append(auth_header(spend_id, spend_secret, value))
            status = 403
        attempts.append((command["wallet"].encode(), value, headers, status))

    replies = Replies(settings.kafka_bootstrap, settings.topics.replies, settings.partitions)
    dead = Replies(settings.kafka_bootstrap, settings.topics.dlq, settings.partitions)
    await replies.start()
    await dead.start()
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, linger_ms=5)
    await producer.start()
    try:
        for key, value, headers, _ in attempts:
            await producer.send(settings.topics.commands, value, key=key, headers=headers)
        await producer.flush()
        async with _ledger(settings, spend) as agent:  # honest traffic, meanwhile and after
            assert (await agent.charge("victim-agent", 5)).ok
        answered = {f"imp-{n}" for n, (_, _, headers, _) in enumerate(attempts)
                    if ("reply_to", settings.topics.replies.encode()) in headers}  # fmt: skip
        await replies.wait_for(answered, timeout_s=180)
        dead_letters = IMPOSTOR_RECORDS - len(answered)
        await _wait(lambda: sum(map(len, dead.received.values())) >= dead_letters, 180)
    finally:
        await producer.stop()
        await replies.stop()
        await dead.stop()

    for n, (_, _, headers, status) in enumerate(attempts):
        name = f"imp-{n}"
        if name in answered:
            [reply] = replies.received[name]
            assert reply["status"] == status and "balance" not in reply and "seq" not in reply, (n, reply)
        else:
            [letter] = dead.received[name]  # the original record, exactly once
            assert letter["id"] == json.loads(attempts[n][1])["id"]
    assert set(dead.received) == {f"imp-{n}" for n in range(IMPOSTOR_RECORDS)} - answered
    after = await _books(settings)
    assert after["victim-agent"]["balance"] == before["victim-agent"]["balance"] - 5
    assert after["neighbour"] == before["neighbour"]
    assert after["decisions"] == before["decisions"] + 1
    assert after["wallets"] == before["wallets"]


async def _books(settings) -> dict:
    connection = await asyncpg.connect(settings.database_url)
    try:
        books = {row["wallet"]: dict(row) for row in await connection.fetch("SELECT * FROM wallets")}
        books["decisions"] = await connection.fetchval("SELECT count(*) FROM decisions")
        books["wallets"] = len(books) - 1
        return books
    finally:
        await connection.close()


async def _wait(condition, timeout_s: float) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.2)
