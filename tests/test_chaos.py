"""Faults during a real load, the short version of `make chaos` (loadtest/chaos.py): every kind of
fault at least once, then every guarantee checked.

It stops and starts the local stack's Kafka and PostgreSQL, so it runs among the last (conftest)
and leaves the stack up whatever happens.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from loadtest import chaos
from tests.test_processes import free_ports
from worker import stack

pytestmark = [pytest.mark.slow, pytest.mark.restarts_stack]

WORKERS = 2
OUTAGE_S = 12  # PostgreSQL down this long; Kafka a third to a half of it


@pytest.fixture(scope="module", autouse=True)
def leave_running() -> Iterator[None]:
    yield
    stack.up()  # other suites share the stack: never leave it down


async def test_every_fault_during_load_keeps_every_guarantee(tmp_path) -> None:
    result = await chaos.main(chaos.arguments([
        "--seconds", "1",  # one fault of each kind, no more
        "--rate", "200", "--workers", str(WORKERS), "--wallets", "100",
        "--gap-min-s", "2", "--gap-max-s", "5", "--outage-s", str(OUTAGE_S), "--seed", "11",
        "--metrics-port", str(free_ports(WORKERS)), "--logs", str(tmp_path),
    ]))  # fmt: skip

    assert result["violations"] == [], result["violations"]
    assert "all invariants hold" in result["audit"], result["audit"]
    assert result["sends_acknowledged"] > 1_000 and result["replies"] >= result["sends_acknowledged"]
    # Each kind really happened: the failpoint worker died by SIGKILL after a commit, the killed
    # worker was started again by its supervisor, the broker and the database were away.
    assert all(result["faults"].get(kind, 0) >= 1 for kind in chaos.KINDS), result["faults"]
    assert result["logs"]["worker_restarts"] >= 1, result["logs"]

    # While PostgreSQL was down each worker that noticed said so once, paused its partitions
    # (its consumer handed it nothing more) and said so on /health; it resumed by itself.
    (outage,) = result["outage_samples"]
    noticed = 0
    for worker in range(WORKERS):
        paused = [s for s in outage if s["unreachable_s"][worker] is not None and s["fetched"][worker] is not None]
        if paused:
            noticed += 1
            assert paused[-1]["fetched"][worker] == paused[0]["fetched"][worker], (worker, outage)
    assert noticed >= 1, outage
    assert 1 <= result["logs"]["database_unreachable_lines"] <= 3 * (WORKERS + 1), result["logs"]
    assert result["logs"]["database_back_lines"] >= 1, result["logs"]
