"""Fixtures over the real services: the stack the project starts itself (or the one named by
FLOORGUARD_KAFKA_BOOTSTRAP and FLOORGUARD_DATABASE_URL), a fresh database per test made from a
migrated template, fresh topics per test under their own prefix, and workers run as the real
`floorguard worker` process."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from floorguard import Ledger
from worker import config
from worker.config import Settings, Topics

ROOT = Path(__file__).resolve().parents[1]
LIBFAKETIME_GLOB = "/usr/lib/*/faketime/libfaketime.so.1"
TEST_PARTITIONS = 4
WORKER_READY_TIMEOUT_S = 60


@dataclass(frozen=True)
class Services:
    kafka_bootstrap: str
    database_url: str


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


@pytest.fixture(scope="session")
def services() -> Services:
    """The real Kafka and PostgreSQL. Missing services fail the run: nothing here skips."""
    if config.endpoints_in_env():
        return Services(os.environ[config.ENV_KAFKA_BOOTSTRAP], os.environ[config.ENV_DATABASE_URL])
    from worker import stack

    endpoints = stack.up()
    return Services(endpoints.kafka_bootstrap, endpoints.database_url)


@pytest.fixture(scope="session")
async def template_database(services: Services) -> str:
    """A database with every migration applied, copied for each test in milliseconds."""
    from worker.store.migrate import migrate

    name = f"floorguard_template_{os.getpid()}"
    admin = await asyncpg.connect(services.database_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    await migrate(_with_database(services.database_url, name))
    return name


@pytest.fixture
async def database_url(services: Services, template_database: str) -> AsyncIterator[str]:
    name = f"floorguard_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(services.database_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_database}"')
    finally:
        await admin.close()
    yield _with_database(services.database_url, name)
    admin = await asyncpg.connect(services.database_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def settings(services: Services, database_url: str) -> AsyncIterator[Settings]:
    """Settings of one test: its own database, topics and consumer group. The topics are deleted
    at its end, so that the broker does not carry every test's partitions into the next."""
    from worker.adapter.topics import create_topics, delete_topics

    prefix = f"test-{uuid.uuid4().hex[:10]}"
    topics = Topics(prefix)
    await create_topics(services.kafka_bootstrap, topics, TEST_PARTITIONS)
    yield Settings(services.kafka_bootstrap, database_url, topics, f"{prefix}-worker", TEST_PARTITIONS)
    await delete_topics(services.kafka_bootstrap, topics)


def skewed_clock(offset: str) -> dict[str, str]:
    """Environment that runs a process with its clock moved by `offset` (e.g. "-10m"): libfaketime,
    preloaded into the worker itself, so that signals reach the worker and not a wrapper."""
    import glob

    found = glob.glob(LIBFAKETIME_GLOB)
    assert found, "libfaketime is required (Debian package faketime; .ci/run installs it)"
    return {"LD_PRELOAD": found[0], "FAKETIME": offset, "FAKETIME_DONT_RESET": "1"}


# Settings a developer's shell may carry (`eval "$(floorguard stack up)"`) that would change what a
# test's worker does: each test names its own.
INHERITED_NOT = (config.ENV_AUTH, config.ENV_MASTER_SECRET, config.ENV_MASTER_SECRET_FILE, config.ENV_KEY)


def worker_env(settings: Settings, **extra: str) -> dict[str, str]:
    return {
        **{name: value for name, value in os.environ.items() if name not in INHERITED_NOT},
        config.ENV_KAFKA_BOOTSTRAP: settings.kafka_bootstrap,
        config.ENV_DATABASE_URL: settings.database_url,
        config.ENV_TOPIC_PREFIX: settings.topics.prefix,
        config.ENV_GROUP_ID: settings.group_id,
        config.ENV_METRICS_PORT: "0",  # several workers run at once; the metrics test names a port
        **extra,
    }


@dataclass
class Workers:
    """Real `floorguard worker` processes for one test; all are stopped at its end."""

    settings: Settings
    log_dir: Path
    processes: list[subprocess.Popen] = field(default_factory=list)

    def start(self, *args: str, **extra_env: str) -> subprocess.Popen:
        log = (self.log_dir / f"worker-{len(self.processes)}.log").open("wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "worker", *args],
            cwd=ROOT,
            env=worker_env(self.settings, **extra_env),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.processes.append(process)
        return process

    def stop_all(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture
def workers(settings: Settings, tmp_path: Path) -> Iterator[Workers]:
    running = Workers(settings, tmp_path)
    yield running
    running.stop_all()


@pytest.fixture
async def ledger(settings: Settings) -> AsyncIterator[Ledger]:
    async with Ledger(settings.kafka_bootstrap, topic_prefix=settings.topics.prefix, timeout_s=20) as client:
        yield client


async def wait_until_serving(ledger: Ledger, wallet: str = "ready-probe") -> None:
    """A worker serves once it answers; the first answer waits for its consumer group to form."""
    probe = {"v": 1, "op": "charge", "id": uuid.uuid4().hex, "wallet": wallet, "amount": 1}
    reply = await asyncio.wait_for(ledger.send(probe, raise_on_refusal=False), WORKER_READY_TIMEOUT_S)
    assert reply.error == "wallet_not_found", reply


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that restart the shared services run last, so that no other test sees the restart."""
    items.sort(key=lambda item: item.get_closest_marker("restarts_stack") is not None)
