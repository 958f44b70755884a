"""Where Kafka's default partitioner puts a key: murmur2 over its bytes, as the Java client does.

The contract places every record of a wallet on one partition this way (so that one writer decides
it, in order); the worker checks each record against it, and places the records it sends by it.
"""

from __future__ import annotations

from functools import lru_cache

_M = 0x5BD1E995
_SEED = 0x9747B28C
_MASK = 0xFFFFFFFF
PLACEMENTS_CACHED_MAX = 1 << 20  # keys are wallet ids, which repeat: a lookup, not a hash, per record


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 (org.apache.kafka.common.utils.Utils.murmur2), as an unsigned 32-bit int."""
    length = len(data)
    h = (_SEED ^ length) & _MASK
    whole = length & ~3
    for i in range(0, whole, 4):
        k = (data[i] | data[i + 1] << 8 | data[i + 2] << 16 | data[i + 3] << 24) * _M & _MASK
        k ^= k >> 24
        k = k * _M & _MASK
        h = (h * _M & _MASK) ^ k
    rest = length & 3
    if rest == 3:
        h ^= data[whole + 2] << 16
    if rest >= 2:
        h ^= data[whole + 1] << 8
    if rest >= 1:
        h ^= data[whole]
        h = h * _M & _MASK
    h ^= h >> 13
    h = h * _M & _MASK
    h ^= h >> 15
    return h


@lru_cache(maxsize=PLACEMENTS_CACHED_MAX)
def partition_of(key: bytes, partitions: int) -> int:
    """The partition of `partitions` that Kafka's default partitioner picks for a record key."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions
