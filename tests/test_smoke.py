import asyncio

import pytest

from floorguard import InsufficientFunds
from tests.conftest import wait_until_serving


async def test_open_credit_charge(workers, ledger):
    workers.start()
    await wait_until_serving(ledger)
    opened = await ledger.open("w1")
    assert opened.ok and opened.seq == 1
    credited = await ledger.credit("w1", 100)
    assert credited.balance == 100
    charged = await ledger.charge("w1", 60)
    assert charged.balance == 40 and charged.amount == 60
    with pytest.raises(InsufficientFunds) as refused:
        await ledger.charge("w1", 41)
    assert refused.value.available == 40


async def test_metrics_and_health(workers, ledger):
    import json
    import socket
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    workers.start(FLOORGUARD_METRICS_PORT=str(port))
    await wait_until_serving(ledger)
    await ledger.open("m")
    with pytest.raises(InsufficientFunds):
        await ledger.charge("m", 5)

    def get(path: str) -> tuple[int, str]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read().decode()

    status, health = get("/health")
    assert status == 200 and json.loads(health)["status"] == "ok" and json.loads(health)["partitions"]
    _, text = get("/metrics")
    assert 'floorguard_decisions_total{op="charge",status="402"} 1.0' in text
    assert "floorguard_batch_commit_seconds_count" in text and "floorguard_consumer_lag_records{partition=" in text
    # The reply can arrive before the worker has counted its record as acknowledged: wait for it.
    for _ in range(100):
        if "floorguard_outbox_backlog_records 0.0" in get("/metrics")[1]:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the outbox backlog never came back to 0")


async def test_a_fetch_that_fails_makes_health_degraded_until_fetches_succeed_again(monkeypatch):
    """Regression: FastStream logs a failed fetch and fetches again, for ever, while the other
    partitions' batches succeed; /health said ok the whole time one partition was stuck (seen with
    a snappy batch before the worker depended on cramjam, D34). The worker's fetch step (the
    real one, with a stand-in consumer) now marks the health degraded, for a while after."""
    from aiokafka.errors import UnsupportedCodecError

    from worker.adapter import app, metrics

    health = metrics.Health()
    monkeypatch.setattr(metrics, "HEALTH", health)

    class Consumer:
        fail = True

        async def getmany(self, timeout_ms: int, max_records: int) -> dict:
            if self.fail:
                raise UnsupportedCodecError("Libraries for snappy compression codec not found")
            return {}

    fetch = app._fetching(10, 5)
    consumer = Consumer()
    assert health.report()[0] == 200
    with pytest.raises(UnsupportedCodecError):
        await fetch(consumer)
    status, body = health.report()
    assert status == 503 and body["status"] == "degraded" and "snappy" in body["fetch_error"], body
    consumer.fail = False
    assert await fetch(consumer) == ()
    assert health.report()[0] == 503  # still within the window: the next fetch may fail again
    monkeypatch.setattr(metrics, "FETCH_FAILED_WINDOW_S", 0.0)
    assert health.report() == (200, {**body, "status": "ok", "fetch_error": None})
