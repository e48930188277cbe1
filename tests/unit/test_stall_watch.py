"""processors/app.py StallWatch: the worker's /readyz says it is stuck from half the stall timeout,
and the worker exits at the full timeout; a worker with nothing waiting, or one taking messages in,
stays ready."""

import time
from types import SimpleNamespace
from typing import Any

import pytest
from faust.types import TP

from processors import app as worker_app
from processors.app import StallWatch

RAW = TP("spend.raw", 0)


class Recovered:
    def is_set(self) -> bool:
        return True


class Consumer:
    def __init__(self, end: int, read: int) -> None:
        self.end = end
        self._read_offset = {RAW: read}
        self._committed_offset: dict[Any, int] = {}

    async def highwaters(self, *tps: Any) -> dict[Any, int]:
        return {tp: self.end for tp in tps}


def watch_over(consumer: Consumer, *, recovering: bool = False) -> StallWatch:
    app: Any = SimpleNamespace(
        rebalancing=False,
        in_recovery=recovering,
        tables=SimpleNamespace(recovery=SimpleNamespace(completed=Recovered())),
        consumer=consumer,
        assignor=SimpleNamespace(assigned_actives=lambda: {RAW}),
        timer=lambda *a, **k: lambda fn: fn,
    )
    return StallWatch(app, ["spend.raw"], timeout_s=60)


async def test_messages_waiting_past_half_the_timeout_make_the_worker_not_ready() -> None:
    watch = watch_over(Consumer(end=10, read=3))
    await watch.check()
    assert watch.readiness() == (True, {"status": "ready"})
    watch.taken_at = time.monotonic() - 31
    await watch.check()
    ready, body = watch.readiness()
    assert not ready and body["status"] == "not_ready"
    assert "spend.raw/0': 6" in body["stuck"] and "none taken in for 31 s" in body["stuck"]
    watch.took_in()
    assert watch.readiness()[0]


async def test_nothing_waiting_is_ready_however_long_the_quiet() -> None:
    watch = watch_over(Consumer(end=10, read=9))
    watch.taken_at = time.monotonic() - 45
    await watch.check()
    assert watch.readiness() == (True, {"status": "ready"})


async def test_a_recovering_worker_is_not_ready_yet() -> None:
    watch = watch_over(Consumer(end=10, read=9), recovering=True)
    assert watch.readiness() == (False, {"status": "recovering"})


async def test_at_the_full_timeout_the_worker_exits_for_a_fresh_one(monkeypatch: pytest.MonkeyPatch) -> None:
    codes: list[int] = []

    def fake_exit(code: int) -> None:
        codes.append(code)

    monkeypatch.setattr(worker_app.os, "_exit", fake_exit)
    watch = watch_over(Consumer(end=10, read=3))
    watch.taken_at = time.monotonic() - 61
    await watch.check()
    assert codes == [75]
