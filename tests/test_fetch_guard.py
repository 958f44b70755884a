"""The fetcher's hand-over (worker/adapter/fetch_guard.py), pure: a fetched partition's bytes, as
aiokafka's own builder writes them, read by aiokafka's `PartitionRecords` with the guard installed.

The worker's consumer gets the core's `Record`s straight from the fetcher (read by native/ in the
common case, else by aiokafka's reader); every other consumer still gets aiokafka's
`ConsumerRecord`s, field for field what they were.
"""

from __future__ import annotations

import random

import pytest
from aiokafka.consumer.fetcher import READ_COMMITTED, PartitionRecords
from aiokafka.errors import CorruptRecordException
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.record.util import calc_crc32c as crc32c
from aiokafka.structs import ConsumerRecord, TopicPartition

from worker.adapter import fetch_guard
from worker.core.model import Record

TP = TopicPartition("fg.commands", 3)
FIRST_OFFSET = 40
SENT = [
    (b"w1", b'{"v":1}', [("reply_to", b"fg.replies"), ("correlation_id", b"c-1")]),
    (None, b"{}", []),
    (b"w2", None, [("reply_to", None)]),  # a header with a null value reads as empty bytes
]


def fetched_bytes() -> bytes:
    builder = DefaultRecordBatchBuilder(magic=2, compression_type=0, is_transactional=0, producer_id=-1,
                                        producer_epoch=-1, base_sequence=-1, batch_size=1 << 20)  # fmt: skip
    for delta, (key, value, headers) in enumerate(SENT):
        builder.append(delta, timestamp=1_764_000_000_000 + delta, key=key, value=value, headers=headers)
    batch = builder.build()
    batch[0:8] = FIRST_OFFSET.to_bytes(8, "big")  # the base offset, as the broker assigns it
    return bytes(batch)


def read(value_deserializer) -> list:
    fetch_guard.install()
    records = fetch_guard._GuardedRecords(fetched_bytes())
    return list(PartitionRecords(TP, records, [], FIRST_OFFSET, None, value_deserializer, True, READ_COMMITTED))


def test_the_worker_s_consumer_gets_the_core_s_records_straight_from_the_fetcher():
    assert read(fetch_guard.hand_over_records) == [
        Record(3, 40, 1_764_000_000_000, b"w1", b'{"v":1}', (("reply_to", b"fg.replies"), ("correlation_id", b"c-1"))),
        Record(3, 41, 1_764_000_000_001, None, b"{}", ()),
        Record(3, 42, 1_764_000_000_002, b"w2", None, (("reply_to", b""),)),
    ]


def test_any_other_consumer_gets_aiokafka_s_records_and_as_record_makes_the_same_of_them():
    records = read(None)
    assert all(isinstance(record, ConsumerRecord) for record in records)
    assert [(r.topic, r.partition, r.offset, r.key, r.value) for r in records] == [
        ("fg.commands", 3, 40 + n, key, value) for n, (key, value, _) in enumerate(SENT)
    ]
    # What replay and the hot-path benchmark do with them is what the worker's fetcher does.
    assert [fetch_guard.as_record(r.partition, r) for r in records] == read(fetch_guard.hand_over_records)


def test_the_hand_over_deserializer_alone_changes_nothing():
    # Were the patch ever missing, aiokafka would call it on each value: it returns the value.
    assert fetch_guard.hand_over_records(b"x") == b"x" and fetch_guard.hand_over_records(None) is None


def random_fetch(rng: random.Random) -> tuple[bytes, int]:
    """Batches as a broker returns them (base offsets assigned, some LogAppendTime), sometimes
    compressed, transactional or with a name that is not UTF-8, the last one sometimes cut short;
    and a fetch offset inside the first batch."""
    out, offset = b"", rng.randrange(0, 1_000)
    first = offset
    for _ in range(rng.choice((1, 2, 5))):
        compressed = rng.random() < 0.1
        builder = DefaultRecordBatchBuilder(magic=2, compression_type=1 if compressed else 0,
                                            is_transactional=int(rng.random() < 0.1), producer_id=-1,
                                            producer_epoch=-1, base_sequence=-1, batch_size=1 << 20)  # fmt: skip
        count = rng.choice((1, 3, 40))
        for delta in range(count):
            headers = [(rng.choice(("reply_to", "correlation_id", "ü", "")), rng.choice((None, b"", rng.randbytes(20))))
                       for _ in range(rng.choice((0, 1, 3)))]  # fmt: skip
            builder.append(delta, timestamp=1_764_000_000_000 + rng.randrange(1_000), headers=headers,
                           key=None if rng.random() < 0.2 else rng.randbytes(rng.randrange(12)),
                           value=None if rng.random() < 0.05 else rng.randbytes(rng.randrange(300)))  # fmt: skip
        batch = bytearray(builder.build())
        batch[0:8] = offset.to_bytes(8, "big")
        if rng.random() < 0.3:  # the topic's LogAppendTime: the broker's time, in the batch's max timestamp
            batch[21:23] = (int.from_bytes(batch[21:23], "big") | 0x08).to_bytes(2, "big")
            batch[35:43] = (1_765_000_000_000).to_bytes(8, "big")
            batch[17:21] = crc32c(bytes(batch[21:])).to_bytes(4, "big")
        if rng.random() < 0.05:  # a header name that is not UTF-8, as any client can write one
            at = bytes(batch).find(b"reply_to")
            if at > 0:
                batch[at] = 0xFF
                batch[17:21] = crc32c(bytes(batch[21:])).to_bytes(4, "big")
        out += bytes(batch)
        offset += count + rng.choice((0, 0, 2))  # a gap: compacted, or a transaction's marker
    if rng.random() < 0.2:
        out = out[: -rng.randrange(1, 30)]  # the fetch's size cut the last batch short
    return out, first + rng.randrange(3)


def read_all(data: bytes, fetch_offset: int, value_deserializer) -> tuple[list, int]:
    fetch_guard.install()
    records = fetch_guard._GuardedRecords(data)
    partition_records = PartitionRecords(TP, records, [], fetch_offset, None, value_deserializer, True, READ_COMMITTED)
    return list(partition_records), partition_records.next_fetch_offset


@pytest.mark.parametrize("seed", range(60))
def test_the_compiled_reader_makes_of_a_fetch_what_aiokafka_and_as_record_make_of_it(seed: int) -> None:
    rng = random.Random(seed)
    data, fetch_offset = random_fetch(rng)
    theirs, their_next = read_all(data, fetch_offset, None)
    ours, our_next = read_all(data, fetch_offset, fetch_guard.hand_over_records)
    assert ours == [fetch_guard.as_record(r.partition, r) for r in theirs]
    assert our_next == their_next


def test_a_fetch_with_a_bad_crc_is_refused_as_aiokafka_refuses_it() -> None:
    data = bytearray(fetched_bytes())
    data[-1] ^= 0xFF
    with pytest.raises(CorruptRecordException):
        read_all(bytes(data), FIRST_OFFSET, fetch_guard.hand_over_records)


def test_without_the_compiled_reader_the_hand_over_is_the_same() -> None:
    # FLOORGUARD_COMPILED=0: every fetch read by aiokafka's reader, each record made by as_record.
    fetch_guard.install(compiled=False)
    try:
        assert fetch_guard._read_compiled is None
        for seed in range(10):
            data, fetch_offset = random_fetch(random.Random(seed))
            theirs, their_next = read_all_installed(data, fetch_offset, None)
            ours, our_next = read_all_installed(data, fetch_offset, fetch_guard.hand_over_records)
            assert (ours, our_next) == ([fetch_guard.as_record(r.partition, r) for r in theirs], their_next)
    finally:
        fetch_guard.install()
    assert fetch_guard._read_compiled is fetch_guard.read_records is not None


def read_all_installed(data: bytes, fetch_offset: int, value_deserializer) -> tuple[list, int]:
    records = fetch_guard._GuardedRecords(data)
    partition_records = PartitionRecords(TP, records, [], fetch_offset, None, value_deserializer, True, READ_COMMITTED)
    return list(partition_records), partition_records.next_fetch_offset
