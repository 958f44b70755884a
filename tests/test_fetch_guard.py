"""The fetcher's hand-over (worker/adapter/fetch_guard.py), pure: a fetched partition's bytes, as
aiokafka's own builder writes them, read by aiokafka's `PartitionRecords` with the guard installed.

The worker's consumer gets the core's `Record`s straight from the fetcher; every other consumer
still gets aiokafka's `ConsumerRecord`s, field for field what they were.
"""

from __future__ import annotations

from aiokafka.consumer.fetcher import READ_COMMITTED, PartitionRecords
from aiokafka.record.default_records import DefaultRecordBatchBuilder
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
