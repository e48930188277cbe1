"""processors/rebalance.py: the fetch loop drops what was fetched before a seek; skips are not
committed, and their partition is read again from the skipped offset.

The fake consumer scripts one fetched batch and a seek landing in the middle of it, as
faust-streaming's recovery does when it resumes partitions before seeking them. The same cases on
faust's real consumer, and checks that faust still has what the patch reads: test_faust_surface.py.
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
        self._committed_offset: dict[Any, int | None] = {}
        self.skip: set[int] = set()  # offsets the stream skips (acknowledged untracked) on delivery
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
        if message.offset in self.skip:
            rebalance._hold(self, SimpleNamespace(tp=TP, offset=message.offset))
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
        """What faust's `Consumer.seek` does (rebalance marks the seeks it makes)."""
        self.reseeks.append(offset)
        self._read_offset[tp] = offset

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
    assert rebalance._seeks(consumer) == {TP: 2}  # the seek, and the one after it: both marked


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


def test_a_message_skipped_unprocessed_makes_the_fetch_loop_read_its_partition_again_from_it() -> None:
    consumer = FakeConsumer([400, 401, 402, 403], seek_at=-1, target=0)
    consumer._committed_offset[TP] = 400
    consumer.skip = {401, 402}
    drain(consumer)
    assert consumer.delivered == [400, 401, 402, 403]
    assert consumer.reseeks == [401] and consumer._read_offset[TP] == 401  # the lowest skipped offset
    assert rebalance._holds(consumer) == {TP: 401} and rebalance._rewinds(consumer) == set()


def test_a_skipped_copy_of_a_message_already_committed_changes_nothing() -> None:
    consumer = FakeConsumer([], seek_at=-1, target=0)
    consumer._committed_offset[TP] = 500
    rebalance._hold(consumer, SimpleNamespace(tp=TP, offset=499))
    assert rebalance._holds(consumer) == {} and rebalance._rewinds(consumer) == set()


def test_a_hold_on_a_partition_revoked_since_is_dropped_without_a_seek() -> None:
    consumer = FakeConsumer([400, 401], seek_at=-1, target=0)
    consumer.skip = {400}
    consumer.assigned = set()
    drain(consumer)
    assert consumer.reseeks == [] and rebalance._holds(consumer) == {}


def held_consumer(committed: int, hold: int, acked: list[int]) -> Any:
    return SimpleNamespace(
        _acked={TP: list(acked)},
        _acked_index={TP: set(acked)},
        _gap={TP: None},
        _committed_offset={TP: committed},
        _spendledger_holds={TP: hold},
    )


def test_commits_stop_at_a_hold_even_where_faust_would_pass_one_missing_offset() -> None:
    rebalance.install()
    from faust.transport.consumer import Consumer

    # faust commits 9..12 over a missing 8 when 8 is the committed offset: it tolerates a gap of one.
    consumer = held_consumer(committed=8, hold=8, acked=[9, 10, 11, 12])
    assert Consumer._new_offset(consumer, TP) == 8  # type: ignore[arg-type]
    consumer = held_consumer(committed=8, hold=10, acked=[8, 9, 10, 11, 12])
    assert Consumer._new_offset(consumer, TP) == 10  # type: ignore[arg-type]
    # Committed past the hold (by the partition's other owner, before it came back): the hold goes.
    consumer = held_consumer(committed=20, hold=10, acked=[20, 21])
    assert Consumer._new_offset(consumer, TP) == 22 and consumer._spendledger_holds == {}  # type: ignore[arg-type]


def test_a_skipped_message_is_not_acknowledged_and_held_until_it_is_processed() -> None:
    rebalance.install()
    from faust.transport.consumer import Consumer

    consumer = SimpleNamespace(
        app=SimpleNamespace(topics=SimpleNamespace(acks_enabled_for=lambda topic: True)),
        _committed_offset={TP: 8},
    )
    skipped = SimpleNamespace(tracked=False, topic=TP.topic, offset=8, tp=TP, acked=False)
    assert Consumer.ack(consumer, skipped) is False  # type: ignore[arg-type]
    assert skipped.acked is False  # faust's own ack (which sets it) never ran: the offset stays uncommitted
    assert rebalance._holds(consumer) == {TP: 8} and rebalance._rewinds(consumer) == {TP}
    later = SimpleNamespace(tracked=True, topic=TP.topic, offset=9, tp=TP, acked=True)  # acked: faust's no-op
    Consumer.ack(consumer, later)  # type: ignore[arg-type]
    assert rebalance._holds(consumer) == {TP: 8}
    again = SimpleNamespace(tracked=True, topic=TP.topic, offset=8, tp=TP, acked=True)
    Consumer.ack(consumer, again)  # type: ignore[arg-type]
    assert rebalance._holds(consumer) == {}


def test_install_refuses_another_faust_version(monkeypatch: pytest.MonkeyPatch) -> None:
    import faust
    from faust.transport.consumer import Consumer

    monkeypatch.setattr(Consumer, "_spendledger_patched", False, raising=False)
    monkeypatch.setattr(faust, "__version__", "0.16.0")
    with pytest.raises(RuntimeError, match="0.15.3"):
        rebalance.install()


def test_messages_a_resume_clears_from_a_stream_queue_are_held_and_read_again() -> None:
    """faust clears the stream queues when flow resumes, after seeking to the committed offsets:
    records fetched from there in between were dropped with the position past them. This uses
    faust's own app, flow control and queues (no broker is contacted)."""
    import faust

    async def scenario() -> tuple[int, dict[Any, int], set[Any]]:
        rebalance.install()
        app = faust.App("test-hold-cleared", broker="kafka://127.0.0.1:9", store="memory://")
        raw = app.topic(TP.topic, value_serializer="raw")
        changelog = app.topic("test-hold-cleared-pending-calls-changelog", value_serializer="raw")
        app.topics._acking_topics.add(TP.topic)  # what subscribing an agent to the topic does
        rebalance.hold_cleared(app)
        app.consumer._committed_offset[TP] = 5
        app.flow_control.resume()

        def event(topic: str, partition: int, offset: int) -> Any:
            tp = TopicPartition(topic, partition)
            return SimpleNamespace(message=SimpleNamespace(tp=tp, topic=topic, offset=offset, tracked=False))

        for offset in (7, 6):
            await raw.queue.put(event(TP.topic, TP.partition, offset))
        await raw.queue.put(event(TP.topic, 3, 4))  # partition 3: no committed offset known
        await changelog.queue.put(event(changelog.get_topic_name(), 1, 3))
        app.flow_control.suspend()  # a rebalance
        app.flow_control.resume()  # ...and the resume that clears the queues
        consumer = app.consumer
        return len(raw.queue._queue), rebalance._holds(consumer), rebalance._rewinds(consumer)

    left, holds, rewinds = asyncio.run(scenario())
    assert left == 0  # faust did clear the queue
    other = TopicPartition(TP.topic, 3)
    assert holds == {TP: 6, other: 4} and rewinds == {TP, other}  # the changelog's acks are off: no hold
