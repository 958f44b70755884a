"""The worker as a FastStream application: one batch subscriber on the commands topic.

FastStream owns the consumer, the producer, the lifespan and the AsyncAPI description. Three
guarantees need the aiokafka consumer beneath it, reached through the subscriber rather than
around it: offsets come from the database (seek on assignment, never Kafka's committed offsets),
a fetched batch is split per partition (FastStream's batch spans partitions), and outbox records
go out byte for byte through the broker's own producer (see `publisher.py`).
"""

from __future__ import annotations

import asyncio
import faulthandler
import gc
import logging
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from itertools import chain
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError
from faststream import AckPolicy, FastStream
from faststream.kafka import KafkaBroker
from faststream.kafka.message import FAKE_CONSUMER
from faststream.kafka.subscriber.usecase import BatchSubscriber
from faststream.kafka.message import KafkaMessage as KafkaMessageClass
from faststream.security import BaseSecurity, SASLScram512

from worker.adapter import fetch_guard, metrics
from worker.adapter.processor import Processor, Rebalance
from worker.adapter.publisher import Publisher, spoiled
from worker.adapter.topics import check_commands_topic
from worker.config import KafkaCredentials, Settings
from worker.core.auth import SWEEPER_KEY_ID, auth_header, derive_secret
from worker.core.model import Hold, Record
from worker.core.native import MISSING, hot_path
from worker.core.outgoing import encode
from worker.store.keys import prepare_worker
from worker.store.store import Store
from worker.sweeper import BrokerClock, SendFailed, Sweeper, expire_command

SESSION_TIMEOUT_MS = 10_000
GRACEFUL_TIMEOUT_S = 30
SHUTDOWN_TIMEOUT_S = 45  # from the start of the lifespan's teardown to a forced exit
PRODUCER_REQUEST_TIMEOUT_MS = 30_000
PRODUCE_BATCH_BYTES_MAX = 512 * 1024
TEND_INTERVAL_S = 1.0
GC_YOUNG_OBJECTS = 50_000  # Python's default is 700
GC_OLDER_EVERY = 20  # young collections per older one (default 10)

log = logging.getLogger("floorguard.worker")


def build_app(settings: Settings) -> FastStream:
    fetch_guard.install(settings.compiled)  # a header name that is not UTF-8 must not stop a partition
    topics = settings.topics
    broker = KafkaBroker(
        settings.kafka_bootstrap,
        client_id="floorguard-worker",
        acks="all",  # a reply promises a decision; its record must survive a broker's crash
        enable_idempotence=True,
        # A partition's replies or events of a batch go as one produce batch (publisher.py): up
        # to this many bytes each, within the broker's default message.max.bytes (1 MiB).
        max_batch_size=PRODUCE_BATCH_BYTES_MAX,
        request_timeout_ms=PRODUCER_REQUEST_TIMEOUT_MS,
        graceful_timeout=GRACEFUL_TIMEOUT_S,
        # FastStream logs "Received" and "Processed" per fetched batch: two lines per command when
        # the load is light, at a measurable cost in CPU and disk. They are debug lines here.
        log_level=logging.DEBUG,
        # The handler takes the fetched records as they are: no dependency injection, which costs a
        # hop to a thread per batch (FastStream's message is resolved by a synchronous function,
        # run on a worker thread) and pydantic work on its argument.
        apply_types=False,
        security=_security(settings.kafka_credentials),
    )
    runtime: dict[str, Any] = {}
    subscriber = None

    def consumer():  # the aiokafka consumer beneath the subscriber, once it has started
        return subscriber.consumer if subscriber is not None else None

    renew_producer = _renewer(broker)
    publisher = Publisher(lambda: _producer(broker), topics.dlq, renew_producer,
                          batch_bytes_max=PRODUCE_BATCH_BYTES_MAX if settings.compiled else None)
    clock = BrokerClock()
    processor = Processor(lambda: runtime["store"], publisher, topics, consumer, clock, settings.look_up_all_records,
                          hot_path(settings.compiled))

    # The sweeper signs its expires with the workers' own key, which may expire and nothing else.
    sweeper_secret = derive_secret(settings.master_secret, SWEEPER_KEY_ID) if settings.master_secret else None

    async def send_expires(holds: Sequence[Hold]) -> int | None:
        """The sweeper's expires, to the commands topic; returns the broker's latest timestamp."""
        producer = _producer(broker)
        futures = []
        try:
            for hold in holds:
                value = encode(expire_command(hold))
                headers = [auth_header(SWEEPER_KEY_ID, sweeper_secret, value)] if sweeper_secret else None
                futures.append(await producer.send(topics.commands, value=value, key=hold.wallet.encode(),
                                                   headers=headers))  # fmt: skip
            sent = await asyncio.wait_for(asyncio.gather(*futures), PRODUCER_REQUEST_TIMEOUT_MS / 1000)
        except KafkaError as error:
            if spoiled(producer, error):
                await renew_producer(producer)
            raise SendFailed(repr(error)) from error
        return max((metadata.timestamp for metadata in sent), default=None)

    sweeper = None
    if settings.sweep_interval_ms > 0:
        sweeper = Sweeper(lambda: runtime["store"], send_expires, processor.sweepable, clock, settings.sweep_interval_ms)

    subscriber = broker.subscriber(
        topics.commands,
        batch=True,
        group_id=settings.group_id,
        auto_offset_reset="earliest",  # overridden on assignment by the database's offsets
        isolation_level="read_committed",  # a command of an aborted transaction never happened
        ack_policy=AckPolicy.MANUAL,  # Kafka's committed offsets are never the source of truth
        max_records=settings.batch_records_max,
        batch_timeout_ms=settings.batch_wait_ms,
        session_timeout_ms=SESSION_TIMEOUT_MS,
        listener=Rebalance(processor, topics.commands),
        parser=_raw_records,
        decoder=_records,
        value_deserializer=fetch_guard.hand_over_records,  # records handed over as the core's `Record`
        no_reply=True,  # replies follow the contract's headers, not FastStream's reply_to
        title=topics.commands,
        description="Commands for the ledger, keyed by wallet (see docs/contract.md).",
    )

    _fetch_without_idle_sleep(subscriber, settings.batch_records_max, settings.batch_wait_ms)
    # FastStream names a fetch in its log lines by its first record's topic, which the core's
    # `Record` does not carry (the fetcher hands those over: see fetch_guard): it is this one.
    subscriber.get_log_context = lambda message: subscriber.build_log_context(
        message=message, topic=topics.commands, group_id=settings.group_id)

    @subscriber
    async def decide(records: tuple[Record, ...]) -> None:
        try:
            await processor.handle(records)
        except BaseException:
            # A bug: stop rather than let the consumer move past records that were not decided.
            # The database still holds each partition's position, so a restart loses nothing.
            log.critical("stopping the worker: a batch failed in a way that is not retried", exc_info=True)
            os.kill(os.getpid(), signal.SIGTERM)
            raise

    for topic, about in ((topics.replies, "Replies to commands that named this topic in reply_to."),
                         (topics.events, "Every stored decision, for audit and projections."),
                         (topics.dlq, "Records too broken to answer, with a reason header.")):  # fmt: skip
        broker.publisher(topic, title=topic, description=about)  # documents the topic in AsyncAPI

    @asynccontextmanager
    async def lifespan() -> AsyncIterator[None]:
        partitions = await check_commands_topic(settings.kafka_bootstrap, topics, settings.kafka_credentials)
        processor.partition_count = partitions  # each record is checked against its key's partition (D33)
        log.info("%s has %d partitions, LogAppendTime, retention forever", topics.commands, partitions)
        runtime["store"] = await Store.connect(settings.database_url, master_secret=settings.master_secret,
                                                 compiled=settings.compiled)
        try:
            async with runtime["store"].pool.acquire() as connection:
                mode = await prepare_worker(connection, settings.auth_required, settings.master_secret)
            log.info("authentication: %s", mode)
            if not processor.hot.compiled:
                why = "switched off (FLOORGUARD_COMPILED=0)" if settings.compiled else f"not installed ({MISSING})"
                log.warning("the compiled hot path is %s: the Python core decides every command, slower", why)
            yield
        finally:
            if not runtime.get("stopping"):  # armed when the shutdown began; here for a start that failed
                _exit_if_stuck()
            await processor.close()
            await processor.flush()  # what was committed goes out before the worker does
            if "tending" in runtime:
                runtime["tending"].cancel()
                await asyncio.gather(runtime["tending"], return_exceptions=True)
            if runtime.get("metrics") is not None:
                runtime["metrics"].close()
            if "sweeper" in runtime:
                runtime["sweeper"].cancel()
                await asyncio.gather(runtime["sweeper"], return_exceptions=True)
            await runtime["store"].close()

    app = FastStream(broker, lifespan=lifespan)

    @app.after_startup
    async def start_sweeper() -> None:  # the producer it writes with exists once the broker runs
        _collect_garbage_rarely()
        if sweeper is not None:
            runtime["sweeper"] = asyncio.create_task(sweeper.run())
        metrics.HEALTH.partitions = processor.owned
        runtime["metrics"] = await metrics.serve(settings.metrics_port, processor.refresh_lag)
        runtime["tending"] = asyncio.create_task(_tend(processor))

    @app.on_shutdown
    async def stop_deciding() -> None:  # before the broker stops: its producer publishes what is committed
        runtime["stopping"] = True
        _exit_if_stuck()
        await processor.stop()

    return app


def _exit_if_stuck() -> None:
    """A worker told to stop must stop: should anything hang from here on (seen once under chaos,
    after a clean shutdown), dump every thread's stack to the log and exit. Nothing is lost:
    decisions are committed whole, and an unpublished outbox is sent by the next owner."""
    faulthandler.dump_traceback_later(SHUTDOWN_TIMEOUT_S, exit=True)


async def _tend(processor: Processor) -> None:
    """Publishes outboxes left behind (a failed publish, a fenced commit) on partitions that see no
    new batch: their replies must not wait for the next command."""
    while True:
        await asyncio.sleep(TEND_INTERVAL_S)
        try:
            await processor.tend()
        except Exception:  # a bug; tending stops, deciding does not (its batches heal as before)
            log.exception("tending the outboxes failed")
            return


def _fetch_without_idle_sleep(subscriber: Any, max_records: int, wait_ms: int) -> None:
    """FastStream's batch subscriber sleeps for its batch timeout after every empty fetch, on top of
    the fetch's own wait: a command that landed during that sleep waited for it (measured: a lone
    command was 4 to 8 ms old when the worker got it). The subscriber's fetch step is replaced by
    one that waits in aiokafka's `getmany` alone, which returns as soon as a record is there."""
    assert isinstance(subscriber, BatchSubscriber) and hasattr(subscriber, "get_msg"), type(subscriber)
    subscriber.get_msg = _fetching(max_records, wait_ms)


def _fetching(max_records: int, wait_ms: int) -> Callable[[AIOKafkaConsumer], Awaitable[tuple]]:
    """One fetch: the records of every partition that has some, in one tuple."""

    async def get_msg(consumer: AIOKafkaConsumer) -> tuple:
        try:
            fetched = await consumer.getmany(timeout_ms=wait_ms, max_records=max_records)
        except Exception as error:  # FastStream logs it and fetches again; /health says so meanwhile
            metrics.HEALTH.fetch_failed(error)
            raise
        return tuple(chain.from_iterable(fetched.values()))  # FastStream's loop skips an empty one

    return get_msg


def _collect_garbage_rarely() -> None:
    """A batch makes a few objects per record that live until it is published: with Python's
    default thresholds the collector ran every few dozen records and walked everything the worker
    had loaded, again and again. What exists at start is frozen (never walked again), and a young
    collection waits for GC_YOUNG_OBJECTS new objects. Nothing on the hot path makes cycles, so the
    rare collections find little; memory stays bounded by reference counting."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_OBJECTS, GC_OLDER_EVERY, GC_OLDER_EVERY)


def _security(credentials: KafkaCredentials | None) -> BaseSecurity | None:
    """The worker's SCRAM user on Kafka, when it has one (docs/kafka-acls.md)."""
    if credentials is None:
        return None
    return SASLScram512(credentials.username, credentials.password, ssl_context=credentials.ssl_context(),
                        use_ssl=credentials.security_protocol == "SASL_SSL")  # fmt: skip


def _producer(broker: KafkaBroker) -> AIOKafkaProducer:
    producer = broker.config.producer._producer.producer  # the broker's connected aiokafka producer
    assert isinstance(producer, AIOKafkaProducer), type(producer)
    return producer


def _renewer(broker: KafkaBroker) -> Callable[[AIOKafkaProducer], Awaitable[None]]:
    """Puts a new aiokafka producer in the place of a spoiled one (see `publisher.spoiled`),
    through FastStream's own `connect`, with the options FastStream built the first one from; then
    stops the old one. Without it the worker went on deciding what it could not publish: every
    publish failed with the broker's OutOfOrderSequenceNumber until a restart. The new producer
    starts before it takes the old one's place, so that every publish and expire finds a producer;
    when the broker is away it does not start, and the next failure tries again. It never raises:
    the failure that called it is what its caller hears of."""
    renewing = asyncio.Lock()
    stopping: set[asyncio.Task[None]] = set()  # old producers being stopped, kept from the collector

    async def renew(spoiled_producer: AIOKafkaProducer) -> None:
        try:
            async with renewing:
                await _renew(spoiled_producer)
        except Exception as error:  # shutting down (FastStream has no producer any more), or a bug
            log.warning("the Kafka producer was not renewed (%r)", error)

    async def _renew(spoiled_producer: AIOKafkaProducer) -> None:
        old = _producer(broker)
        if old is not spoiled_producer:
            return  # renewed by another publish meanwhile
        log.warning("the Kafka producer can send no more: starting a new one")
        holder = broker.config.producer
        new = AIOKafkaProducer(**broker._connection_kwargs)
        try:
            await holder.connect(new, serializer=holder.serializer, codec=holder.codec)
        except Exception as error:  # the broker is away: the next failed publish tries again
            log.warning("a new Kafka producer did not start (%r)", error)
            await new.stop()
            return
        metrics.PRODUCERS_RENEWED.inc()
        # Stopped aside: its `stop` waits for what it still holds, which the broker refuses.
        task = asyncio.create_task(old.stop())
        stopping.add(task)
        task.add_done_callback(_stopped(stopping))

    return renew


def _stopped(tasks: set[asyncio.Task[None]]) -> Callable[[asyncio.Task[None]], None]:
    def done(task: asyncio.Task[None]) -> None:
        tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("the old Kafka producer did not stop cleanly (%r)", task.exception())

    return done


async def _raw_records(records: tuple, original_parser: Any) -> KafkaMessageClass:
    """Hands the records over untouched: FastStream's parser decodes headers as UTF-8 and would
    stop at the first malformed one, which the contract answers with a 422 instead."""
    first = records[0]
    return KafkaMessageClass(
        body=b"",
        headers={},
        reply_to="",
        message_id=f"{first.partition}-{first.offset}-{records[-1].offset}",
        correlation_id="",
        raw_message=records,
        consumer=FAKE_CONSUMER,  # offsets are never committed to Kafka: see the module's docstring
    )


async def _records(message: Any, original_decoder: Any) -> tuple[Record, ...]:
    """The handler's argument: the records of the fetch, as the fetcher handed them over."""
    return message.raw_message
