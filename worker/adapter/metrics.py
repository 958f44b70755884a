"""Prometheus metrics and a health endpoint, served by the worker on FLOORGUARD_METRICS_PORT.

    GET /metrics  Prometheus text format
    GET /health   200 {"status": "ok", ...} while the worker owns partitions and its last batch
                  succeeded; 503 with the reason otherwise (`database_unreachable_s`: how long the
                  database has been away, its partitions paused; null when it answers;
                  `fetch_error`: the consumer's last failed fetch, for FETCH_FAILED_WINDOW_S after it)
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

REQUEST_SIZE_MAX_BYTES = 8_192
REQUEST_TIMEOUT_S = 5
FETCH_FAILED_WINDOW_S = 60.0  # a failed fetch keeps /health degraded this long (FastStream retries within it)

DECISIONS = Counter("floorguard_decisions_total", "Records decided, by op and status", ["op", "status"])
BATCH_SIZE = Histogram("floorguard_batch_records", "Records in one partition's batch",
                       buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000))  # fmt: skip
COMMIT_SECONDS = Histogram("floorguard_batch_commit_seconds", "One partition batch's transaction, begin to commit",
                           buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5))  # fmt: skip
PUBLISH_SECONDS = Histogram("floorguard_publish_seconds", "Publishing a batch's replies and events, until acknowledged",
                            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5))  # fmt: skip
CONSUMER_LAG = Gauge("floorguard_consumer_lag_records", "Records not yet fetched, per owned partition", ["partition"])
OUTBOX_BACKLOG = Gauge("floorguard_outbox_backlog_records", "Committed records not yet acknowledged by the broker")
SWEPT = Counter("floorguard_sweeper_expires_total", "expire commands written by the sweeper")
RECORDS_FETCHED = Counter("floorguard_records_fetched_total", "Command records handed to the worker by its consumer")
DATABASE_UNREACHABLE = Gauge("floorguard_database_unreachable", "1 while the database is unreachable, else 0")
DATABASE_OUTAGES = Counter("floorguard_database_outages_total", "Times the database became unreachable")
DECIDED_AGAIN = Counter("floorguard_batches_decided_again_total",
                        "Commits refused because an id presumed new had a decision stored; their batches are "
                        "decided again, every id looked up")  # fmt: skip
PRODUCERS_RENEWED = Counter("floorguard_kafka_producers_renewed_total",
                            "Kafka producers replaced after the broker refused theirs for good (OutOfOrderSequenceNumber)")
PAUSED_PARTITIONS = Gauge("floorguard_paused_partitions", "Partitions not fetched until the database answers")

log = logging.getLogger("floorguard.metrics")


class Health:
    def __init__(self) -> None:
        self.last_batch_ok_s: float | None = None
        self.last_error: str | None = None
        self.database_away_since_s: float | None = None
        self.partitions: Callable[[], list[int]] = list
        # A fetch that fails (a batch the consumer cannot read) is retried by FastStream's loop
        # for ever while the other partitions' batches still succeed: without its own field the
        # endpoint said ok the whole time a partition was stuck.
        self.fetch_error: str | None = None
        self.fetch_failed_s: float | None = None

    def fetch_failed(self, error: BaseException) -> None:
        self.fetch_error, self.fetch_failed_s = repr(error), time.monotonic()

    def report(self) -> tuple[int, dict]:
        owned = self.partitions()
        body = {"partitions": owned, "last_error": self.last_error,
                "last_batch_age_s": None if self.last_batch_ok_s is None
                else round(time.monotonic() - self.last_batch_ok_s, 3),
                "database_unreachable_s": None if self.database_away_since_s is None
                else round(time.monotonic() - self.database_away_since_s, 3)}  # fmt: skip
        fetch_failing = self.fetch_failed_s is not None and time.monotonic() - self.fetch_failed_s < FETCH_FAILED_WINDOW_S
        body["fetch_error"] = self.fetch_error if fetch_failing else None
        healthy = self.last_error is None and not fetch_failing
        body["status"] = "ok" if healthy else "degraded"
        return (200 if healthy else 503), body


HEALTH = Health()


async def serve(port: int, refresh: Callable[[], None]) -> asyncio.AbstractServer | None:
    """Serve /metrics and /health on the port (0: not at all). A port in use is logged, not fatal."""
    if port <= 0:
        return None

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT_S)
            path = request[:REQUEST_SIZE_MAX_BYTES].split(b" ", 2)[1] if b" " in request else b"/"
            if path == b"/metrics":
                refresh()
                status, body, kind = 200, generate_latest(), CONTENT_TYPE_LATEST
            elif path == b"/health":
                status, report = HEALTH.report()
                body, kind = json.dumps(report).encode(), "application/json"
            else:
                status, body, kind = 404, b"not found\n", "text/plain"
            reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[status]
            writer.write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
                         "Connection: close\r\n\r\n".encode() + body)  # fmt: skip
            await writer.drain()
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()

    try:
        return await asyncio.start_server(handle, "127.0.0.1", port, limit=REQUEST_SIZE_MAX_BYTES)
    except OSError as error:
        log.warning("metrics not served on port %d: %s", port, error)
        return None
