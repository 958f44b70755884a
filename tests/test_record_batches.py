"""The produce batches native/ writes (`record_batch`, `finish`), pure: byte for byte what
aiokafka's own batch builder writes for the same records, split at the same places, and read back
by aiokafka's reader with a valid CRC. The worker's publisher sends them in place of aiokafka's
(worker/adapter/publisher.py); the extension is built by `make`: these tests fail, never skip,
without it.
"""

from __future__ import annotations

import random

import pytest
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.record.memory_records import MemoryRecords
from floorguard_native import finish, record_batch

from worker.adapter.publisher import _WrittenBatch
from worker.core.outgoing import Outgoing

TIMESTAMP_MS = 1_764_000_000_123
PRODUCER = (4_711, 3, 1_000)  # id, epoch, base sequence


def outgoing(rng: random.Random) -> Outgoing:
    def blob(most: int) -> bytes:
        return rng.randbytes(rng.choice((0, 1, rng.randrange(most))))

    headers = tuple((rng.choice(("content-type", "correlation_id", "reason", "ü-name", "")), blob(300))
                    for _ in range(rng.choice((0, 1, 2, 5))))  # fmt: skip
    key = None if rng.random() < 0.2 else blob(80)
    return Outgoing("fg.replies", None, key, blob(rng.choice((100, 2_000, 70_000))), headers)


def aiokafka_batches(records: list[Outgoing], size_max: int, producer=PRODUCER) -> list[bytes]:
    """What the publisher's aiokafka path sends: a builder filled until it is full, then the next."""
    out, builder = [], BatchBuilder(size_max, 0)
    for record in records:
        if builder.append(timestamp=TIMESTAMP_MS, key=record.key, value=record.value, headers=list(record.headers)) is None:
            out.append(finished(builder, producer))
            builder = BatchBuilder(size_max, 0)
            assert builder.append(timestamp=TIMESTAMP_MS, key=record.key, value=record.value, headers=list(record.headers))
    return [*out, finished(builder, producer)]


def finished(builder: BatchBuilder, producer) -> bytes:
    if producer is not None:
        builder._set_producer_state(*producer)
    return bytes(builder._build())


def written_batches(records: list[Outgoing], size_max: int, producer=PRODUCER) -> list[bytes]:
    out, start = [], 0
    while start < len(records):
        data, end = record_batch(records, start, TIMESTAMP_MS, size_max)
        batch = _WrittenBatch(data, end - start)
        if producer is not None:
            batch._set_producer_state(*producer)
        out.append(bytes(batch._build()))
        start = end
    return out


@pytest.mark.parametrize("seed", range(40))
def test_a_written_batch_is_byte_for_byte_aiokafka_s(seed: int) -> None:
    rng = random.Random(seed)
    records = [outgoing(rng) for _ in range(rng.choice((1, 2, 30, 200)))]
    size_max = rng.choice((16 * 1024, 64 * 1024, 512 * 1024))
    producer = None if seed % 5 == 0 else PRODUCER  # a producer without idempotence sets nothing
    ours = written_batches(records, size_max, producer)
    assert ours == aiokafka_batches(records, size_max, producer)
    # aiokafka's reader takes them, CRC checked, record for record.
    read = []
    for data in ours:
        memory = MemoryRecords(data)
        while memory.has_next():
            batch = memory.next_batch()
            assert batch.validate_crc()
            assert (batch.producer_id, batch.producer_epoch, batch.base_sequence) == (producer or (-1, -1, 0))
            read += [(r.key, r.value, tuple(r.headers), r.timestamp) for r in batch]
    assert read == [(r.key, r.value, r.headers, TIMESTAMP_MS) for r in records]


def test_the_producer_may_set_its_state_again_and_a_record_past_the_size_is_sent_alone() -> None:
    big = Outgoing("fg.events", None, b"w", b"x" * 5_000, ())
    data, end = record_batch([big, big], 0, TIMESTAMP_MS, 1_000)
    assert end == 1  # the first record is taken whatever its size, as aiokafka takes it
    batch = _WrittenBatch(data, 1)
    batch._set_producer_state(1, 0, 5)
    batch._set_producer_state(*PRODUCER)  # a retry under a new epoch: the fields and the CRC again
    assert bytes(batch._build()) == aiokafka_batches([big], 1_000)[0]
    assert batch.record_count() == 1 and batch.closed() and batch.append(timestamp=None, key=None, value=b"") is None


def test_what_is_not_a_record_is_refused_with_a_clear_error() -> None:
    with pytest.raises(ValueError, match="value is bytes or None"):
        record_batch([Outgoing("t", None, None, "text", ())], 0, TIMESTAMP_MS, 1_000)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no record"):
        record_batch([], 0, TIMESTAMP_MS, 1_000)
    with pytest.raises(ValueError, match="message format v2"):
        finish(bytearray(10), 1, 0, 0)
