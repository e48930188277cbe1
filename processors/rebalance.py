"""Fixes to faust-streaming's consumer so that a rebalance loses nothing.

What goes wrong (measured with two workers, one killed with -9: the survivor lost
8-69 events in about 1 run in 5):

1. Recovery resumes the stream partitions *before* seeking them to the committed
   offsets (`Recovery._resume_streams`), and the fetcher keeps iterating a batch
   while the seek runs. Records fetched from the old position are then delivered
   after the seek: the jump from the committed offset to theirs is recorded as a
   "gap" that counts as acknowledged, and the read offset moves past the records
   the seek was meant to fetch again, so those are dropped as already read.
2. Records that reach a stream while flow control is suspended (mid-rebalance) or
   that carry an older consumer generation are skipped by the stream, and the skip
   acknowledges them: their offsets are committed although nothing processed them.

3. When flow resumes after a rebalance, faust-streaming clears every stream's queue
   (`clear_on_resume`). It seeks the partitions to their committed offsets *before*
   resuming, and the fetcher may deliver records from there in between: the clear
   then drops them silently, with the consumer's position already past them. (Seen
   with batches every 20 ms: the survivor of a kill -9 left 4-7 messages of a
   partition unprocessed in about 1 run in 4.)

The fixes, installed by `install()` and `hold_cleared(app)` in each worker:

- A seek marks its partitions. The fetch loop (`Consumer._drain_messages`, copied
  from faust-streaming 0.15.3 with the changes marked `# fix:`) drops records of a
  partition sought since they were fetched, does not move the read offset of such
  a partition, and seeks it again to where the seek put it (the records may have
  been fetched after the seek, in which case the consumer's position is past them).
- An acknowledgement of a message no stream took in (`tracked` is set when a stream
  takes a message, before any processing) does not count towards the committed
  offset. Its offset becomes the partition's *hold*: commits stop below it, and the
  fetch loop seeks the partition back to it, so the message is fetched and processed
  again; processing it releases the hold. (Without the hold, faust's commit, which
  tolerates one missing offset after the committed one, could move past it.)
- A message a resume clears from a stream's queue is held the same way.

4. Recovery reads a table's changelog up to the end offsets `ListOffsets` gives. Tansu
   answers with the last batch's first offset + 1, so a worker that recovered after a
   kill -9 missed the tail of each partition's last batch: the budget agent's spend was
   short by about 1,000 events in one CI run. `highwaters` (recovery's, and the stall
   watch's) now reads each partition's end by fetching (`spendledger.kafka.fetched_end_offsets`).

Every dropped record is fetched again, so the worst case stays a replay, which the
ledger absorbs (join done-markers, budget event ids, the sink's event_id check).
A hold whose message is gone (compacted or deleted by retention before it was read
again) keeps that partition's commits where they are until the next rebalance: the
cost is a longer replay, not a loss.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any, cast

from faust.transport import consumer as faust_consumer
from faust.types import TP

from processors import metrics
from spendledger.kafka import fetched_end_offsets

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
        await consumer.seek(tp, target)


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
        await consumer.seek(tp, target or 0)


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
        (Consumer, "seek"),
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
    seek = Consumer.seek
    seek_wait = ThreadDelegateConsumer.seek_wait
    ack = Consumer.ack
    new_offset = Consumer._new_offset
    highwaters = ThreadDelegateConsumer.highwaters

    async def seek_to_committed_marked(self: Any) -> Mapping[TP, int]:
        # `perform_seek` sets the read offsets from this result with no await in between.
        offsets = await seek_to_committed(self)
        _mark_sought(self, [faust_consumer.ensure_TP(tp) for tp in offsets])
        return cast(Mapping[TP, int], offsets)

    async def seek_marked(self: Any, partition: TP, offset: int) -> None:
        await seek(self, partition, offset)
        _mark_sought(self, [partition])

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
    Consumer.seek = seek_marked  # type: ignore[method-assign]
    ThreadDelegateConsumer.seek_wait = seek_wait_marked  # type: ignore[method-assign]
    Consumer.ack = ack_taken_only  # type: ignore[method-assign]
    Consumer._new_offset = new_offset_held  # type: ignore[method-assign]
    Consumer._drain_messages = _drain_messages  # type: ignore[method-assign]
    Consumer._spendledger_patched = True  # type: ignore[attr-defined]


async def _drain_messages(self: Any, fetcher: Any) -> None:  # pragma: no cover - runs in the worker
    """faust-streaming 0.15.3 `Consumer._drain_messages`, with the seek checks (`# fix:`)."""
    callback = self.callback
    getmany = self.getmany
    consumer_should_stop = self._stopped.is_set
    fetcher_should_stop = fetcher._stopped.is_set

    get_read_offset = self._read_offset.__getitem__
    set_read_offset = self._read_offset.__setitem__
    flag_consumer_fetching = faust_consumer.CONSUMER_FETCHING
    set_flag = self.diag.set_flag
    unset_flag = self.diag.unset_flag
    commit_every = self._commit_every
    acks_enabled_for = self.app.topics.acks_enabled_for
    seeks = _seeks(self)  # fix
    rewinds = _rewinds(self)  # fix
    # fix (speed): faust races every delivery against the flow being suspended (`wait_first`: four
    # futures per message, a tenth of a worker's time). That race matters only when the delivery
    # can block on flow control, which it checks first, synchronously; when the flow is active it
    # passes at once, and a delivery waiting on a full queue is freed by the rebalance clearing it.
    flow_is_active = self.app.flow_control.is_active

    yield_every = 100
    num_since_yield = 0
    sleep = asyncio.sleep

    try:
        while not (consumer_should_stop() or fetcher_should_stop()):
            set_flag(flag_consumer_fetching)
            fetched_at = dict(seeks)  # fix: the seeks before this fetch
            stale: set[TP] = set()  # fix
            ait = getmany(timeout=1.0)

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
                        if flow_is_active():  # fix (speed): nothing to race, see below
                            await callback(message)
                        else:
                            await self.wait_first(callback(message), self.suspend_flow.wait())
                        if seeks.get(tp, 0) == fetched_at.get(tp, 0):  # fix: a seek meanwhile wins
                            set_read_offset(tp, offset)
                    else:
                        self.log.dev(
                            "DROPPED MESSAGE ROFF %r: k=%r v=%r",
                            offset,
                            message.key,
                            message.value,
                        )
                if stale:  # fix
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
