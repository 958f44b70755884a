"""The embedded local stack, for real: a Kafka broker and a PostgreSQL under the repo's .floorguard/.

Slow the first time (Maven fetch, initdb, broker start); later runs reuse the running stack.
Other suites share the stack, so it is left running at the end whatever happens.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from worker import stack
from worker.config import LOCAL_DATABASE_URL, LOCAL_KAFKA_BOOTSTRAP, LOCAL_KAFKA_PORT, LOCAL_POSTGRES_PORT
from worker.stack import kafka, postgres

HOST = "127.0.0.1"
SECOND_UP_MAX_S = 5.0
TCP_CONNECT_TIMEOUT_S = 2.0
PROBE_TABLE = "stack_probe"
PROBE_VALUE = "kept across down and up"

# It stops and restarts the shared stack: conftest runs these after every other test.
pytestmark = [pytest.mark.slow, pytest.mark.restarts_stack]


@pytest.fixture(scope="module", autouse=True)
def leave_running() -> Iterator[None]:
    yield
    stack.up()  # other suites share the stack: never leave it down


def psql(sql: str) -> str:
    psql_path = postgres.bindir() / "psql"
    done = subprocess.run(
        [str(psql_path), LOCAL_DATABASE_URL, "-v", "ON_ERROR_STOP=1", "-tAq", "-c", sql],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def accepts_tcp(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=TCP_CONNECT_TIMEOUT_S):
            return True
    except OSError:
        return False


def meta_properties() -> str:
    return (kafka.Layout.under(stack.home()).data / "meta.properties").read_text()


def our_broker_pids() -> list[int]:
    properties = str(kafka.Layout.under(stack.home()).properties).encode()
    pids = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if kafka.MAIN_CLASS.encode() in args and properties in args:
            pids.append(int(entry.name))
    return pids


def test_up_is_idempotent_and_serves() -> None:
    first = stack.up()
    started_s = time.monotonic()
    second = stack.up()
    second_up_s = time.monotonic() - started_s

    expected = stack.Endpoints(kafka_bootstrap=LOCAL_KAFKA_BOOTSTRAP, database_url=LOCAL_DATABASE_URL)
    assert first == second == expected
    assert second_up_s < SECOND_UP_MAX_S
    assert len(our_broker_pids()) == 1

    kafka_line, postgres_line = stack.status()
    assert kafka_line.startswith("kafka: running (pid ")
    assert postgres_line.startswith("postgresql: running (pid ")

    assert accepts_tcp(LOCAL_KAFKA_PORT)
    assert accepts_tcp(LOCAL_POSTGRES_PORT)
    assert psql("select 1") == "1"


def test_down_then_up_keeps_data() -> None:
    stack.up()
    psql(f"drop table if exists {PROBE_TABLE}; create table {PROBE_TABLE} (note text)")
    psql(f"insert into {PROBE_TABLE} values ('{PROBE_VALUE}')")
    cluster_id = kafka.Layout.under(stack.home()).cluster_id_file.read_text().strip()
    assert f"cluster.id={cluster_id}" in meta_properties()

    stack.down()
    assert stack.status() == ["kafka: stopped", "postgresql: stopped"]
    assert our_broker_pids() == []
    assert not accepts_tcp(LOCAL_KAFKA_PORT)
    assert not accepts_tcp(LOCAL_POSTGRES_PORT)

    stack.up()
    try:
        assert psql(f"select note from {PROBE_TABLE}") == PROBE_VALUE
        assert f"cluster.id={cluster_id}" in meta_properties()  # the same storage, not reformatted
        assert len(our_broker_pids()) == 1
    finally:
        psql(f"drop table if exists {PROBE_TABLE}")
