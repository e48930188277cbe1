"""Events are checked in a process of the API's own: errors cross back with their details, and a
process that dies costs its requests a 503 (retry), not the API."""

import asyncio
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from ingest.errors import Forbidden, IngestUnavailable, InvalidEvent, PayloadTooLarge
from ingest.prepare import IngestPool
from ledger.scopes import Binding
from ledger.tags import AttributionPolicy


def options(**overrides: Any) -> dict[str, Any]:
    return {
        "received_at": datetime.now(UTC),
        "max_future_skew_s": 300.0,
        "binding": Binding(),
        "policy": AttributionPolicy(),
        "partitions": 4,
        "max_event_bytes": 900_000,
        "warnings": True,
        **overrides,
    }


def body(*events: dict[str, Any]) -> bytes:
    return orjson.dumps({"events": list(events)})


GOOD = {
    "kind": "request",
    "request_id": "pool-1",
    "model": "openai/gpt-4o",
    "headers": {"x-litellm-tags": "team:a"},
}


@pytest.fixture(scope="module")
def pool() -> Any:
    pool = IngestPool(1)
    pool.start()
    yield pool
    pool.close()


def test_a_batch_is_prepared_in_another_process(pool: IngestPool) -> None:
    prepared = asyncio.run(pool.run(body(GOOD, {**GOOD, "request_id": "pool-2"}), **options()))
    assert prepared.kinds == ["request", "request"]
    assert len(prepared.event_ids) == 2 and prepared.messages
    assert all(isinstance(value, bytes) for _, value in prepared.messages)


@pytest.mark.parametrize(
    ("payload", "extra", "error", "detail"),
    [
        (
            body(GOOD, {"kind": "request"}),
            {},
            InvalidEvent,
            lambda d: d[0]["loc"] == ["events", 1, "request_id"],
        ),
        (
            body({**GOOD, "headers": {"x-litellm-tags": "team:b"}}),
            {"binding": Binding.of(tags=["team:a"])},
            Forbidden,
            lambda d: d["field"] == "tags" and d["index"] == 0,
        ),
        (
            body({**GOOD, "metadata": {"notes": "x" * 2_000_000}}),
            {},
            PayloadTooLarge,
            lambda d: d["limit_bytes"] == 900_000,
        ),
    ],
)
def test_errors_come_back_with_their_details(
    pool: IngestPool, payload: bytes, extra: dict[str, Any], error: type[Exception], detail: Any
) -> None:
    with pytest.raises(error) as raised:
        asyncio.run(pool.run(payload, **options(**extra)))
    assert detail(raised.value.details), raised.value.details  # type: ignore[attr-defined]


def test_a_killed_process_fails_its_request_with_503_and_the_next_one_works() -> None:
    pool = IngestPool(1)
    pool.start()
    try:
        children = pool._executor._processes  # type: ignore[union-attr]
        for pid in list(children):
            os.kill(pid, signal.SIGKILL)
        with pytest.raises(IngestUnavailable) as raised:
            asyncio.run(pool.run(body(GOOD), **options()))
        assert raised.value.retry_after_s == 1
        assert asyncio.run(pool.run(body(GOOD), **options())).kinds == ["request"]
    finally:
        pool.close()


def test_an_ingest_process_exits_when_the_api_is_killed(tmp_path: Any) -> None:
    script = tmp_path / "api.py"
    script.write_text(
        "import sys, time\n"
        "from ingest.prepare import IngestPool\n"
        "if __name__ == '__main__':\n"
        "    pool = IngestPool(1); pool.start()\n"
        "    print(*pool._executor._processes, flush=True)\n"
        "    time.sleep(60)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    api = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, env=env, text=True)
    child = int(api.stdout.readline())  # type: ignore[union-attr]
    api.kill()
    api.wait(10)
    deadline = time.monotonic() + 10
    while _alive(child):
        assert time.monotonic() < deadline, "the ingest process outlived the API"
        time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie is gone for our purpose
        return stat.read().split()[2] != "Z"
