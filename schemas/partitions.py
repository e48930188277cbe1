"""Where a keyed message goes: the two partitioners the ledger's producers use, in one place.

Messages of one key must meet on one partition: a bundle of events with each event's own key, a tag's
spend with its budget definitions (the budget agent's table is co-partitioned with `spend.tag-spend`).
So a message the ledger builds for several keys is placed where the producer that writes that topic
would place each of them.

- `spend.raw` is written by the API with librdkafka's default (`consistent_random`): CRC-32 of the key.
- `spend.tag-spend` is written by the worker with `murmur2_random`, the Java client's (and Faust's)
  murmur2 of the key. `tests/unit/test_partitions.py` holds it to the Java client's own test vectors;
  `tests/integration/shared/test_pipeline.py` watches both land where the real producers put them.
"""

from __future__ import annotations

import zlib


def librdkafka_partition(key: bytes, partitions: int) -> int:
    """librdkafka's `consistent_random` for a keyed message."""
    return zlib.crc32(key) % partitions


def murmur2(data: bytes) -> int:
    """The Java client's murmur2 (`org.apache.kafka.common.utils.Utils.murmur2`), as a signed 32-bit int."""
    length = len(data)
    seed, m, r = 0x9747B28C, 0x5BD1E995, 24
    h = (seed ^ length) & 0xFFFFFFFF
    for i in range(0, length - length % 4, 4):
        k = int.from_bytes(data[i : i + 4], "little")
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> r
        k = (k * m) & 0xFFFFFFFF
        h = (h * m) & 0xFFFFFFFF
        h ^= k
    tail = length % 4
    base = length - tail
    if tail == 3:
        h ^= data[base + 2] << 16
    if tail >= 2:
        h ^= data[base + 1] << 8
    if tail >= 1:
        h ^= data[base]
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return h - (1 << 32) if h & 0x80000000 else h


def java_partition(key: bytes, partitions: int) -> int:
    """The Java client's (and librdkafka's `murmur2_random`) placement of a keyed message."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions
