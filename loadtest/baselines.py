"""The seed design and a naive one, against the same PostgreSQL, for comparison.

- **seed**: one guarded statement and one commit per charge, from N concurrent clients
  (`UPDATE … SET balance = balance − $1 WHERE … AND balance − reserved − $1 >= floor`): correct,
  and bounded by one hot row's lock held until its commit is flushed.
- **naive**: read the balance, check it in the client, write the new balance: two statements, no
  guard. Shows in numbers the overshoot that a hard cap exists to prevent.

Closed loop (each client sends its next charge when the last is answered): the seed design's best
case. Results are JSON lines.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from urllib.parse import urlsplit, urlunsplit

import asyncpg

SEED_STATEMENT = ("UPDATE bench_wallets SET balance = balance - $1 "
                  "WHERE wallet = $2 AND balance - reserved - $1 >= floor")  # fmt: skip
SCHEMA = """
CREATE TABLE bench_wallets (wallet text PRIMARY KEY, balance bigint NOT NULL, reserved bigint NOT NULL DEFAULT 0,
                            floor bigint NOT NULL DEFAULT 0);
"""


async def fresh_database(server_url: str) -> tuple[str, str]:
    name = f"baseline_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = urlunsplit(urlsplit(server_url)._replace(path=f"/{name}"))
    connection = await asyncpg.connect(url)
    try:
        await connection.execute(SCHEMA)
    finally:
        await connection.close()
    return name, url


async def drop(server_url: str, name: str) -> None:
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def fund(url: str, wallets: int, balance: int) -> None:
    connection = await asyncpg.connect(url)
    try:
        await connection.execute("TRUNCATE bench_wallets")
        await connection.execute("INSERT INTO bench_wallets (wallet, balance) SELECT 'w' || i, $1 FROM generate_series(0, $2 - 1) AS i",
                                 balance, wallets)  # fmt: skip
    finally:
        await connection.close()


async def seed(url: str, clients: int, wallets: int, seconds: float) -> dict:
    """Charges per second through the seed's guarded statement, one commit each."""
    await fund(url, wallets, 10**15)
    pool = await asyncpg.create_pool(url, min_size=clients, max_size=clients)
    done = [0]
    deadline = time.monotonic() + seconds

    async def client(n: int) -> None:
        async with pool.acquire() as connection:
            i = n
            while time.monotonic() < deadline:
                await connection.execute(SEED_STATEMENT, 1, f"w{i % wallets}")
                done[0] += 1
                i += clients

    started = time.monotonic()
    await asyncio.gather(*(client(n) for n in range(clients)))
    elapsed = time.monotonic() - started
    await pool.close()
    return {"design": "seed", "clients": clients, "wallets": wallets, "charges_per_s": round(done[0] / elapsed)}


async def naive(url: str, clients: int, funded_for: int, amount: int, attempts: int) -> dict:
    """Read, check in the client, write: how far past its funds a hot wallet goes."""
    await fund(url, 1, funded_for * amount)
    pool = await asyncpg.create_pool(url, min_size=clients, max_size=clients)
    accepted = [0]
    remaining = [attempts]

    async def client() -> None:
        async with pool.acquire() as connection:
            while remaining[0] > 0:
                remaining[0] -= 1
                balance = await connection.fetchval("SELECT balance FROM bench_wallets WHERE wallet = 'w0'")
                if balance - amount >= 0:
                    await connection.execute("UPDATE bench_wallets SET balance = $1 WHERE wallet = 'w0'", balance - amount)
                    accepted[0] += 1

    started = time.monotonic()
    await asyncio.gather(*(client() for _ in range(clients)))
    elapsed = time.monotonic() - started
    await pool.close()
    overshoot = max(accepted[0] - funded_for, 0)
    return {"design": "naive", "clients": clients, "funded_for": funded_for, "accepted": accepted[0],
            "overshoot_charges": overshoot, "overshoot_amount": overshoot * amount,
            "charges_per_s": round(attempts / elapsed)}  # fmt: skip


async def run_all(server_url: str, seconds: float, client_counts: tuple[int, ...] = (8, 32, 64)) -> list[dict]:
    name, url = await fresh_database(server_url)
    try:
        results = []
        for wallets in (1, 10_000):
            runs = [await seed(url, clients, wallets, seconds) for clients in client_counts]
            best = max(runs, key=lambda r: r["charges_per_s"])
            results.append({**best, "all_client_counts": {r["clients"]: r["charges_per_s"] for r in runs}})
        results.append(await naive(url, 32, funded_for=1_000, amount=7, attempts=5_000))
        return results
    finally:
        await drop(server_url, name)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", required=True, help="a server to create a scratch database on")
    parser.add_argument("--seconds", type=float, default=5)
    arguments = parser.parse_args()
    for line in asyncio.run(run_all(arguments.database_url, arguments.seconds)):
        print(json.dumps(line))
