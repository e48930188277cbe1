"""The partitioners of schemas/partitions.py against what the clients themselves compute."""

import pytest
from aiokafka.partitioner import murmur2 as aiokafka_murmur2  # type: ignore[import-untyped]

from schemas.partitions import java_partition, librdkafka_partition, murmur2


@pytest.mark.parametrize(
    ("text", "expected"),
    [  # org.apache.kafka.common.utils.UtilsTest.testMurmur2
        ("21", -973932308),
        ("foobar", -790332482),
        ("a-little-bit-long-string", -985981536),
        ("a-little-bit-longer-string", -1486304829),
        ("lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
        ("abc", 479470107),
    ],
)
def test_murmur2_is_the_java_clients(text: str, expected: int) -> None:
    assert murmur2(text.encode()) == expected


@pytest.mark.parametrize("key", [b"", b"a", b"team:search", "équipe:données".encode(), bytes(range(256))])
def test_java_placement_equals_aiokafkas_and_so_faust_s(key: bytes) -> None:
    for partitions in (1, 4, 7, 64):
        assert java_partition(key, partitions) == (aiokafka_murmur2(key) & 0x7FFFFFFF) % partitions


def test_librdkafka_placement_is_crc32() -> None:
    # rd_kafka_msg_partitioner_consistent: rd_crc32(key) % partition_cnt; 0xCBF43926 is CRC-32's check
    # value for "123456789". The real producer's placement: tests/integration/shared/test_pipeline.py.
    assert [librdkafka_partition(b"123456789", n) for n in (1, 4, 1000)] == [
        0,
        0xCBF43926 % 4,
        0xCBF43926 % 1000,
    ]
