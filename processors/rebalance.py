"""Patches to faust-streaming 0.15.3's consumer so that a rebalance loses nothing.

The holes, and what closes each (how they were found and measured: docs/reliability.md):

1. Recovery resumes stream partitions before seeking them to their committed offsets, and the fetch
   loop keeps delivering a batch fetched before the seek: the jump to those records counts as an
   acknowledged gap, and the read offset moves past what the seek was to fetch again.
   Fix: a seek marks its partitions; the fetch loop drops the records of a partition sought since they
   were fetched, leaves its read offset to the seek, and seeks it again to the same place.
2. A stream skips a message that arrives mid-rebalance (or from an older generation), and the skip
   acknowledges it. Fix: acknowledging a message no stream took in (`tracked`) does not count. Its
   offset becomes the partition's *hold*: commits stop below it, the fetch loop seeks back to it, and
   processing it releases the hold. (faust commits over one missing offset right after the committed
   one: without the hold it could pass this one.)
3. When flow resumes, faust clears every stream's queue (`clear_on_resume`), after seeking to the
   committed offsets: records fetched in between are dropped with the position past them.
   Fix: `hold_cleared` holds each message the resume clears.
4. Recovery reads a changelog up to the end offsets `ListOffsets` gives; Tansu lists the last batch's
   first offset + 1. Fix: `highwaters` (recovery's, and the stall watch's) reads each end by fetching.

The worst case is a replay, which the ledger absorbs (join done-markers, budget event ids, the sink's
event_id check). A hold whose message is gone (compacted, or deleted by retention) keeps its
partition's commits where they are until the next rebalance: a longer replay, not a loss.

Patched: `Consumer._drain_messages` (faust's, copied and changed on the lines marked `# fix:` and
`# speed:`); `Consumer.ack`, `Consumer._new_offset`, `ThreadDelegateConsumer.seek_to_committed`,
`.seek_wait`, `.highwaters` and each app's `flow_control.resume` (wrapped).
tests/unit/test_faust_surface.py checks them against faust's real classes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, cast

from faust.transport import consumer as faust_consumer
from faust.transport.consumer import CONSUMER_FETCHING
from faust.types import TP
from mode import Service

from processors import metrics
from spendledger.platform.kafka import fetched_end_offsets

log = logging.getLogger(__name__)

PATCHED_VERSION = "0.15.3"
Consumer = faust_consumer.Consumer
ThreadDelegateConsumer = faust_consumer.ThreadDelegateConsumer


def _seeks(consumer: Any) -> dict[TP, int]:
    """How many times each partition has been sought (created on first use)."""
    return cast(dict[TP, int], consumer.__dict__.setdefault("_spendledger_seeks", {}))


def _mark_sought(consumer: Any, partitions: Any) -> None:
    seeks = _seeks(consumer)
    for tp in partitions:
        seeks[tp] = seeks.get(tp, 0) + 1


async def _seek(consumer: Any, tp: TP, offset: int) -> None:
    """`consumer.seek`, marked. faust never calls `Consumer.seek` itself: these are the only such seeks."""
    await consumer.seek(tp, offset)
    _mark_sought(consumer, [tp])


def _holds(consumer: Any) -> dict[TP, int]:
    """Per partition, the lowest offset skipped or cleared unprocessed (see the module docstring)."""
    return cast(dict[TP, int], consumer.__dict__.setdefault("_spendledger_holds", {}))


def _rewinds(consumer: Any) -> set[TP]:
    """Partitions with a hold that the fetch loop has yet to seek back to."""
    return cast(set[TP], consumer.__dict__.setdefault("_spendledger_rewinds", set()))


def _hold(consumer: Any, message: Any) -> None:
    """`message` was skipped or cleared without being processed: read its partition again from there."""
    tp, offset = message.tp, message.offset
    committed = consumer._committed_offset.get(tp)
    if committed is not None and offset < committed:
        return  # an old copy of a message processed and committed since
    holds = _holds(consumer)
    if offset < holds.get(tp, offset + 1):
        holds[tp] = offset
    _rewinds(consumer).add(tp)


async def _rewind(consumer: Any, partitions: set[TP]) -> None:
    """Seek each partition with a hold back to it. A partition no longer assigned drops its hold:
    its commits never passed the hold, so its next owner reads the message again."""
    holds = _holds(consumer)
    assigned = consumer.assignment()
    for tp in list(partitions):
        partitions.discard(tp)
        target = holds.get(tp)
        if target is None:
            continue  # processed meanwhile
        if tp not in assigned:
            del holds[tp]
            continue
        log.info("messages skipped or cleared unprocessed; reading %s again from offset %d", tp, target)
        consumer._read_offset[tp] = target
        await _seek(consumer, tp, target)


async def _reseek(consumer: Any, partitions: set[TP]) -> None:
    """Seek again to where the last seek put each partition (its read offset). A partition no longer
    assigned is left alone (seeking it would raise): its next owner starts from the committed offset."""
    assigned = consumer.assignment()
    for tp in partitions:
        if tp not in assigned:
            continue
        target = consumer._read_offset.get(tp)
        metrics.STALE_FETCHES.inc()
        log.info("records fetched before a seek dropped; seeking %s again to offset %s", tp, target)
        # No read offset: the seek found no committed offset, so the partition starts at its beginning.
        await _seek(consumer, tp, target or 0)


def hold_cleared(app: Any) -> None:
    """Hold every message `app.flow_control.resume()` is about to clear from a stream's queue
    (see the module docstring), so its partition is read again from it."""
    flow = app.flow_control
    resume = flow.resume

    def resume_holding() -> None:
        consumer = app.consumer
        for queue in list(flow._queues):
            for item in list(queue._queue):
                message = getattr(item, "message", None)
                if message is not None and app.topics.acks_enabled_for(message.topic):
                    metrics.CLEARED_ON_RESUME.inc()
                    _hold(consumer, message)
        resume()

    flow.resume = resume_holding


_fetch_config: dict[str, Any] | None = None


def install(kafka_config: dict[str, Any] | None = None) -> None:
    """Patch faust's consumer classes (idempotent). With `kafka_config`, end offsets are fetched."""
    global _fetch_config
    if kafka_config is not None:
        _fetch_config = kafka_config
    if getattr(Consumer, "_spendledger_patched", False):
        return
    import faust

    if faust.__version__ != PATCHED_VERSION:
        raise RuntimeError(
            f"processors/rebalance.py was written for faust-streaming {PATCHED_VERSION}, found {faust.__version__}"
        )
    for owner, name in (
        (Consumer, "_drain_messages"),
        (Consumer, "ack"),
        (Consumer, "_new_offset"),
        (ThreadDelegateConsumer, "seek_wait"),
        (ThreadDelegateConsumer, "seek_to_committed"),
        (ThreadDelegateConsumer, "highwaters"),
    ):
        if not callable(getattr(owner, name, None)):
            raise RuntimeError(
                f"faust-streaming changed: {owner.__name__}.{name} is missing; review processors/rebalance.py"
            )

    seek_to_committed = ThreadDelegateConsumer.seek_to_committed
    seek_wait = ThreadDelegateConsumer.seek_wait
    ack = Consumer.ack
    new_offset = Consumer._new_offset
    highwaters = ThreadDelegateConsumer.highwaters

    async def seek_to_committed_marked(self: Any) -> Mapping[TP, int]:
        # `perform_seek` sets the read offsets from this result with no await in between.
        offsets = await seek_to_committed(self)
        _mark_sought(self, [faust_consumer.ensure_TP(tp) for tp in offsets])
        return cast(Mapping[TP, int], offsets)

    async def seek_wait_marked(self: Any, partitions: Mapping[TP, int]) -> None:
        await seek_wait(self, partitions)
        _mark_sought(self, list(partitions))

    def ack_taken_only(self: Any, message: Any) -> bool:
        if self.app.topics.acks_enabled_for(message.topic):
            if not message.tracked:
                # Skipped by a stream before it was taken in (see the module docstring): not processed.
                metrics.SKIPPED_UNACKED.inc()
                _hold(self, message)
                return False
            holds = _holds(self)
            if holds and holds.get(message.tp) == message.offset:
                del holds[message.tp]
        return cast(bool, ack(self, message))

    def new_offset_held(self: Any, tp: TP) -> int | None:
        # The offsets this takes from the acknowledged list above a hold are read and acknowledged again.
        offset = cast("int | None", new_offset(self, tp))
        holds = _holds(self)
        hold = holds.get(tp)
        if offset is None or hold is None:
            return offset
        committed = self._committed_offset.get(tp)
        if committed is not None and hold < committed:
            del holds[tp]  # the partition was reassigned and committed past it by its other owner
            return offset
        return min(offset, hold)

    async def highwaters_fetched(self: Any, *partitions: TP) -> Mapping[TP, int]:
        listed = await highwaters(self, *partitions)
        if _fetch_config is None or not listed:
            return listed
        ends = await asyncio.to_thread(
            fetched_end_offsets, _fetch_config, {(tp.topic, tp.partition): end for tp, end in listed.items()}
        )
        return {tp: ends[(tp.topic, tp.partition)] for tp in listed}

    ThreadDelegateConsumer.highwaters = highwaters_fetched  # type: ignore[method-assign]
    ThreadDelegateConsumer.seek_to_committed = seek_to_committed_marked  # type: ignore[method-assign]
    ThreadDelegateConsumer.seek_wait = seek_wait_marked  # type: ignore[method-assign]
    Consumer.ack = ack_taken_only  # type: ignore[method-assign]
    Consumer._new_offset = new_offset_held  # type: ignore[method-assign]
    Consumer._drain_messages = _drain_messages  # type: ignore[method-assign]
    Consumer._spendledger_patched = True  # type: ignore[attr-defined]


def _deliverer(consumer: Any, callback: Any) -> Callable[[Any], Awaitable[Any]]:
    """Speed, not a fix: faust races each delivery against the flow being suspended (`wait_first`, four
    futures a message). Only a suspended flow can hold a delivery up, so the race runs only then: while
    the flow is active a delivery passes flow control at once, and one waiting on a full queue is freed
    when the rebalance clears that queue."""
    flow_is_active = consumer.app.flow_control.is_active

    def deliver(message: Any) -> Awaitable[Any]:
        if flow_is_active():
            return cast(Awaitable[Any], callback(message))
        return cast(Awaitable[Any], consumer.wait_first(callback(message), consumer.suspend_flow.wait()))

    return deliver


async def _drain_messages(self: Any, fetcher: Any) -> None:
    """faust-streaming 0.15.3's `Consumer._drain_messages`, changed only on the lines marked `# fix:`
    (the seek checks) and `# speed:` (`_deliverer`)."""
    callback = self.callback
    getmany = self.getmany
    consumer_should_stop = cast(Service, self)._stopped.is_set
    fetcher_should_stop = cast(Service, fetcher)._stopped.is_set

    get_read_offset = self._read_offset.__getitem__
    set_read_offset = self._read_offset.__setitem__
    flag_consumer_fetching = CONSUMER_FETCHING
    set_flag = self.diag.set_flag
    unset_flag = self.diag.unset_flag
    commit_every = self._commit_every
    acks_enabled_for = self.app.topics.acks_enabled_for
    seeks = _seeks(self)  # fix: seek marks
    rewinds = _rewinds(self)  # fix: holds to seek back to
    deliver = _deliverer(self, callback)  # speed

    yield_every = 100
    num_since_yield = 0
    sleep = asyncio.sleep

    try:
        while not (consumer_should_stop() or fetcher_should_stop()):
            set_flag(flag_consumer_fetching)
            fetched_at = dict(seeks)  # fix: the seeks before this fetch
            stale: set[TP] = set()  # fix: partitions sought since
            ait = cast(AsyncIterator, getmany(timeout=1.0))

            # Sleeping because sometimes getmany is called in a loop
            # never releasing to the event loop
            await self.sleep(0)
            if not self.should_stop:
                async for tp, message in ait:
                    num_since_yield += 1
                    if num_since_yield > yield_every:
                        await sleep(0)
                        num_since_yield = 0

                    if seeks.get(tp, 0) != fetched_at.get(tp, 0):  # fix: fetched before a seek
                        stale.add(tp)
                        continue
                    offset = message.offset
                    r_offset = get_read_offset(tp)
                    if r_offset is None or offset >= r_offset:
                        gap = offset - (r_offset or 0)
                        # We have a gap in income messages
                        if gap > 1 and r_offset:
                            acks_enabled = acks_enabled_for(message.topic)
                            if acks_enabled:
                                await self._add_gap(tp, r_offset + 1, offset)
                        if commit_every is not None:
                            if self._n_acked >= commit_every:
                                self._n_acked = 0
                                await self.commit()
                        await deliver(message)  # speed: no `wait_first` race while the flow is active
                        if seeks.get(tp, 0) == fetched_at.get(tp, 0):  # fix: a seek meanwhile wins
                            set_read_offset(tp, offset)
                    else:
                        self.log.dev(
                            "DROPPED MESSAGE ROFF %r: k=%r v=%r",
                            offset,
                            message.key,
                            message.value,
                        )
                if stale:  # fix: seek them again
                    await _reseek(self, stale)
                if rewinds:  # fix: after the reseeks, which a rewind overrides
                    await _rewind(self, rewinds)
                unset_flag(flag_consumer_fetching)

    except self.consumer_stopped_errors:
        if self.transport.app.should_stop:
            # we're already stopping so ignore
            self.log.info("Broker stopped consumer, shutting down...")
            return
        raise
    except asyncio.CancelledError:
        if self.transport.app.should_stop:
            # we're already stopping so ignore
            self.log.info("Consumer shutting down for user cancel.")
            return
        raise
    except Exception as exc:
        self.log.exception("Drain messages raised: %r", exc)
        raise
    finally:
        unset_flag(flag_consumer_fetching)
