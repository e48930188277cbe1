"""processors/rebalance.py: the fetch loop drops what was fetched before a seek; skips are not committed.

The fake consumer scripts one fetched batch and a seek landing in the middle of it, as
faust-streaming's recovery does when it resumes partitions before seeking them.
"""

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from faust.types import TP as TopicPartition

from processors import rebalance

TP = TopicPartition("spend.raw", 1)


class Stopped:
    def __init__(self) -> None:
        self.stopped = False

    def is_set(self) -> bool:
        return self.stopped


class FakeConsumer:
    """Just what `_drain_messages` touches. `seek_at`: seek to `target` when this offset is fetched
    (after its delivery: `during_callback`)."""

    consumer_stopped_errors = ()
    should_stop = False

    def __init__(
        self, offsets: list[int], seek_at: int, target: int, *, during_callback: bool = False
    ) -> None:
        self.offsets, self.seek_at, self.target, self.during_callback = (
            offsets,
            seek_at,
            target,
            during_callback,
        )
        self._stopped = Stopped()
        self._read_offset: dict[Any, int | None] = {TP: None}
        self._commit_every = None
        self._n_acked = 0
        self.delivered: list[int] = []
        self.gaps: list[tuple[int, int]] = []
        self.reseeks: list[int] = []
        self.app = SimpleNamespace(
            topics=SimpleNamespace(acks_enabled_for=lambda topic: True),
            flow_control=SimpleNamespace(is_active=lambda: self.flow_active),
        )
        self.flow_active = True
        self.raced = 0
        self.assigned = {TP}
        self.diag = SimpleNamespace(set_flag=lambda flag: None, unset_flag=lambda flag: None)
        self.suspend_flow = asyncio.Event()
        self.log = SimpleNamespace(dev=lambda *a: None, info=lambda *a: None, exception=lambda *a: None)
        self.transport = SimpleNamespace(app=SimpleNamespace(should_stop=False))

    def the_seek(self) -> None:
        """What perform_seek does: the consumer's position and read offset to the committed offset."""
        self._read_offset[TP] = self.target
        rebalance._mark_sought(self, [TP])

    async def getmany(self, timeout: float) -> Any:
        for offset in self.offsets:
            yield TP, SimpleNamespace(offset=offset, topic=TP.topic, key=b"k", value=b"v")
            if offset == self.seek_at and not self.during_callback:
                self.the_seek()
        self._stopped.stopped = True  # one fetch is enough

    async def callback(self, message: Any) -> None:
        self.delivered.append(message.offset)
        if message.offset == self.seek_at and self.during_callback:
            self.the_seek()

    async def wait_first(self, *coros: Any) -> None:
        self.raced += 1
        for other in coros[1:]:
            other.close()  # the suspend-flow wait: never set here
        await coros[0]

    async def sleep(self, _s: float) -> None:
        await asyncio.sleep(0)

    async def _add_gap(self, tp: Any, start: int, end: int) -> None:
        self.gaps.append((start, end))

    async def seek(self, tp: Any, offset: int) -> None:
        self.reseeks.append(offset)
        self._read_offset[tp] = offset
        rebalance._mark_sought(self, [tp])

    async def commit(self) -> None:
        pass

    def assignment(self) -> set[Any]:
        return self.assigned


def drain(consumer: FakeConsumer) -> None:
    fetcher = SimpleNamespace(_stopped=Stopped())
    asyncio.run(rebalance._drain_messages(consumer, fetcher))


def test_records_fetched_before_a_seek_are_dropped_and_the_partition_sought_again() -> None:
    consumer = FakeConsumer([400, 401, 402, 403], seek_at=401, target=380)
    drain(consumer)
    assert consumer.delivered == [400, 401]  # 402 and 403 came from the old position
    assert consumer.gaps == []  # no jump from 380 to 402 counted as acknowledged
    assert consumer.reseeks == [380] and consumer._read_offset[TP] == 380


def test_a_seek_during_a_delivery_keeps_its_read_offset() -> None:
    consumer = FakeConsumer([400, 401, 402], seek_at=401, target=380, during_callback=True)
    drain(consumer)
    assert consumer.delivered == [400, 401]
    assert consumer._read_offset[TP] == 380  # not 401: the records from 380 on are fetched again
    assert consumer.reseeks == [380] and consumer.gaps == []


def test_without_a_seek_every_record_is_delivered_in_order() -> None:
    consumer = FakeConsumer([7, 8, 9], seek_at=-1, target=0)
    drain(consumer)
    assert consumer.delivered == [7, 8, 9] and consumer._read_offset[TP] == 9
    assert consumer.reseeks == [] and consumer.gaps == []


def test_a_partition_revoked_since_is_not_sought_again() -> None:
    consumer = FakeConsumer([400, 401, 402], seek_at=400, target=380)
    consumer.assigned = set()  # revoked by a later rebalance: aiokafka would refuse the seek
    drain(consumer)
    assert consumer.delivered == [400] and consumer.reseeks == []


@pytest.mark.parametrize("active", [True, False])
def test_a_delivery_races_the_flow_being_suspended_only_when_it_is(active: bool) -> None:
    consumer = FakeConsumer([1, 2, 3], seek_at=-1, target=0)
    consumer.flow_active = active
    drain(consumer)
    assert consumer.delivered == [1, 2, 3]
    assert consumer.raced == (0 if active else 3)


def test_a_seek_with_no_committed_offset_seeks_the_partition_to_its_beginning() -> None:
    consumer = FakeConsumer([5, 6], seek_at=5, target=None)  # type: ignore[arg-type]
    drain(consumer)
    assert consumer.delivered == [5] and consumer.reseeks == [0]


def test_a_message_skipped_before_a_stream_took_it_is_not_acknowledged() -> None:
    rebalance.install()
    from faust.transport.consumer import Consumer

    consumer = SimpleNamespace(
        app=SimpleNamespace(topics=SimpleNamespace(acks_enabled_for=lambda topic: True)),
        _committed_offset={TP: 10},
    )
    skipped = SimpleNamespace(tracked=False, topic=TP.topic, offset=12, tp=TP, acked=False)
    assert Consumer.ack(consumer, skipped) is False  # type: ignore[arg-type]
    assert skipped.acked is False  # faust's own ack (which sets it) never ran: the offset stays uncommitted


def test_install_refuses_another_faust_version(monkeypatch: pytest.MonkeyPatch) -> None:
    import faust
    from faust.transport.consumer import Consumer

    monkeypatch.setattr(Consumer, "_spendledger_patched", False, raising=False)
    monkeypatch.setattr(faust, "__version__", "0.16.0")
    with pytest.raises(RuntimeError, match="0.15.3"):
        rebalance.install()
