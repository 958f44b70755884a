"""A record whose header name is not UTF-8 must not stop a partition.

aiokafka decodes header names as strict UTF-8 while it hands fetched records over, so one such
record (any client that writes raw bytes can send it) makes every fetch of its partition raise,
for ever: a poison pill that no retry cures. The contract answers every record instead. So the
fetcher's record sets are wrapped: a batch is read by aiokafka's fast reader as before, and only a
batch that fails to decode is read again by its pure-Python reader with header names decoded
leniently (undecodable bytes kept as surrogates, which `as_record` turns into U+FFFD). The
contract ignores headers it does not know, so such a record is then decided like any other.

Reached through aiokafka's fetcher module (its `MemoryRecords` name) because no consumer option
governs header decoding; `install()` checks that the name is still there (aiokafka is pinned).

The same place hands the worker's records over as the core's `Record` (`as_record`): aiokafka
makes a `ConsumerRecord` of each fetched record, which the worker then made into a `Record`, two
objects where one does. A consumer asks for it with `hand_over_records` as its value deserializer
(an option FastStream's subscriber passes on); every other consumer gets aiokafka's records, and
were the patch ever missing, the function only returns the value it is given. With native/
installed, such a consumer's fetched bytes are read into `Record`s in one call (`read_records`)
when they hold only the common case (uncompressed, not transactional, no control batch, a valid
CRC, UTF-8 header names); any other fetch is read by aiokafka's reader as before.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

import aiokafka.consumer.fetcher as fetcher
from aiokafka.record.default_records import _DefaultRecordBatchPy
from aiokafka.record.memory_records import MemoryRecords

from worker.core.model import Record

try:
    from floorguard_native import read_records
except ImportError:  # a worker installed without native/ (or an older build of it): aiokafka's reader
    read_records = None
_read_compiled = read_records  # see install()

BATCH_FRAMING_BYTES = 12  # a record batch starts with its base offset (int64) and its length (int32)


class _LenientBuffer(bytearray):
    """A record buffer whose slices decode undecodable bytes as surrogates instead of raising."""

    def __getitem__(self, key: Any) -> Any:
        found = super().__getitem__(key)
        return _LenientBuffer(found) if isinstance(key, slice) else found

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:  # noqa: ARG002
        return super().decode(encoding, "surrogateescape")


class _GuardedBatch:
    __slots__ = ("_batch", "_data")

    def __init__(self, batch: Any, data: bytes) -> None:
        self._batch = batch
        self._data = data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._batch, name)

    def __iter__(self) -> Iterator[Any]:
        try:
            return iter(list(self._batch))
        except UnicodeDecodeError:
            return _leniently(self._data, self._batch.base_offset)


class _GuardedRecords:
    """What the fetcher makes of a fetched partition's bytes: aiokafka's own record set, its batches
    guarded."""

    __slots__ = ("_data", "_records")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._records = MemoryRecords(data)

    def has_next(self) -> bool:
        return self._records.has_next()

    def next_batch(self) -> Any:
        batch = self._records.next_batch()
        return None if batch is None else _GuardedBatch(batch, self._data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._records, name)


def _leniently(data: bytes, base_offset: int) -> Iterator[Any]:
    """The batch at `base_offset` of a fetched partition's bytes, read by the pure-Python reader."""
    position = 0
    while position + BATCH_FRAMING_BYTES <= len(data):
        found_offset, length = struct.unpack_from(">qi", data, position)  # baseOffset, batchLength
        end = position + BATCH_FRAMING_BYTES + length
        if found_offset == base_offset and end <= len(data):
            batch = _DefaultRecordBatchPy(memoryview(data)[position:end])
            iter(batch)  # decompresses, if it must, into a fresh buffer
            batch._buffer = _LenientBuffer(batch._buffer)
            return iter(list(batch))
        position = end
    raise AssertionError(f"batch at offset {base_offset} not found again in its own fetch")


def hand_over_records(value: bytes | None) -> bytes | None:
    """The value deserializer of a consumer whose fetcher hands over `Record`s (see the module)."""
    return value


def as_record(partition: int, record: Any) -> Record:
    """A fetched record (aiokafka's, or anything with its attributes) as the core takes it: header
    values that are not bytes (a null) read as empty, header names kept as surrogates by the
    lenient reader made UTF-8 (U+FFFD)."""
    headers = record.headers
    for name, value in headers:
        if value.__class__ is not bytes or not name.isascii():  # rare: normalized once, here
            headers = [(name if name.isascii() else _utf8(name), value if isinstance(value, bytes) else b"")
                       for name, value in headers]  # fmt: skip
            break
    return Record(partition, record.offset, record.timestamp, record.key, record.value, tuple(headers))


def _utf8(name: str) -> str:
    """A header name as text that can be stored and sent again: bytes that were not UTF-8 (kept as
    surrogates by the lenient reader) become U+FFFD."""
    try:
        name.encode()
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return name


_aiokafka_consumer_record = fetcher.PartitionRecords._consumer_record


def _consumer_record(self: Any, tp: Any, record: Any) -> Any:
    if self._value_deserializer is hand_over_records:
        return as_record(tp.partition, record)
    return _aiokafka_consumer_record(self, tp, record)


_aiokafka_unpack_records = fetcher.PartitionRecords._unpack_records


def _unpack_records(self: Any) -> Iterator[Any]:
    """`PartitionRecords`' generator of a fetched partition's records; for a consumer that asks
    for `Record`s, the common case read by native/ in one call (see the module)."""
    records, read_compiled = self._records, _read_compiled
    handed_over = self._value_deserializer is hand_over_records and records.__class__ is _GuardedRecords
    if handed_over and read_compiled is not None:
        read = read_compiled(records._data, self._tp.partition, self.next_fetch_offset, self._check_crcs, Record)
        if read is not None:
            fetched, next_offset = read
            for record in fetched:
                self.next_fetch_offset = record.offset + 1  # where the consumer resumes if it stops here
                yield record
            self.next_fetch_offset = next_offset
            return
    yield from _aiokafka_unpack_records(self)


def install(compiled: bool = True) -> None:
    """Patches aiokafka's fetcher, once per process; `compiled=False` (`FLOORGUARD_COMPILED=0`)
    leaves every fetch to aiokafka's reader."""
    global _read_compiled
    _read_compiled = read_records if compiled else None
    assert fetcher.MemoryRecords in (MemoryRecords, _GuardedRecords), "aiokafka's fetcher changed: review fetch_guard"
    fetcher.MemoryRecords = _GuardedRecords
    assert fetcher.PartitionRecords._consumer_record in (_aiokafka_consumer_record, _consumer_record), \
        "aiokafka's fetcher changed: review fetch_guard"
    fetcher.PartitionRecords._consumer_record = _consumer_record
    assert fetcher.PartitionRecords._unpack_records in (_aiokafka_unpack_records, _unpack_records), \
        "aiokafka's fetcher changed: review fetch_guard"
    fetcher.PartitionRecords._unpack_records = _unpack_records
