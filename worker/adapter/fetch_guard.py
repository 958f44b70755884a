"""A record whose header name is not UTF-8 must not stop a partition.

aiokafka decodes header names as strict UTF-8 while it hands fetched records over, so one such
record (any client that writes raw bytes can send it) makes every fetch of its partition raise,
for ever: a poison pill that no retry cures. The contract answers every record instead. So the
fetcher's record sets are wrapped: a batch is read by aiokafka's fast reader as before, and only a
batch that fails to decode is read again by its pure-Python reader with header names decoded
leniently (undecodable bytes kept as surrogates, which `record_of` turns into U+FFFD). The
contract ignores headers it does not know, so such a record is then decided like any other.

Reached through aiokafka's fetcher module (its `MemoryRecords` name) because no consumer option
governs header decoding; `install()` checks that the name is still there (aiokafka is pinned).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

import aiokafka.consumer.fetcher as fetcher
from aiokafka.record.default_records import _DefaultRecordBatchPy
from aiokafka.record.memory_records import MemoryRecords

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


def install() -> None:
    assert fetcher.MemoryRecords in (MemoryRecords, _GuardedRecords), "aiokafka's fetcher changed: review fetch_guard"
    fetcher.MemoryRecords = _GuardedRecords
