"""The whole embedded system, started by the project's own code, once per test module."""

import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

from spendledger.embedded import EmbeddedSystem
from spendledger.platform.kafka import consumer_lag


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Ledger:
    """A test's handle on the running system: send events, query ClickHouse."""

    def __init__(self, system: EmbeddedSystem):
        self.system = system
        self.http = httpx.Client(base_url=system.api_url, timeout=30)
        self.bootstrap = system.child_env["SPENDLEDGER_KAFKA_BOOTSTRAP"]

    def send(self, payload: Any, key: str | None = None) -> httpx.Response:
        return self.http.post(
            "/v1/events", json=payload, headers={"Authorization": f"Bearer {key or self.system.producer_key}"}
        )

    def new_budget(self, name: str, max_budget: Any, duration: str) -> httpx.Response:
        """`POST /tag/new` with the admin key."""
        return self.http.post(
            "/tag/new",
            json={"name": name, "max_budget": max_budget, "budget_duration": duration},
            headers={"Authorization": f"Bearer {self.system.admin_key}"},
        )

    def sql(self, query: str) -> list[list[Any]]:
        r = self.http.post(
            "/v1/sql", json={"query": query}, headers={"Authorization": f"Bearer {self.system.admin_key}"}
        )
        assert r.status_code == 200, r.text
        return r.json()["rows"]

    def settle(self, timeout: float = 90) -> None:
        """Until every topic the services read is processed to its end, twice in a row (as `up`'s drain
        decides): after this nothing more lands, so a check that nothing is doubled needs no fixed sleep."""
        settings = self.system.settings()
        groups = settings.topics.consumed()
        deadline = time.monotonic() + timeout
        clear = 0
        while clear < 2:
            lag = consumer_lag(settings, groups, timeout_s=5)
            clear = clear + 1 if not any(lag.values()) else 0
            if time.monotonic() > deadline:
                raise AssertionError(f"still unprocessed after {timeout:.0f} s: {lag}")
            time.sleep(0.25)

    def wait_for(
        self, query: str, done: Callable[[list[list[Any]]], bool], timeout: float = 60
    ) -> list[list[Any]]:
        deadline = time.monotonic() + timeout
        while True:
            rows = self.sql(query)
            if done(rows):
                return rows
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting; last result of {query!r}: {rows}")
            time.sleep(0.25)


@contextmanager
def running_system(tmp_path_factory: Any, **settings: str) -> Iterator[Ledger]:
    """The embedded system in a fresh data dir, with its own topic prefix and short join timeouts."""
    data_dir = tmp_path_factory.mktemp("ledger")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPENDLEDGER_")}
    env.update(
        {
            "SPENDLEDGER_REQUEST_TIMEOUT_S": "4",
            "SPENDLEDGER_USAGE_WAIT_S": "2",
            "SPENDLEDGER_TOPIC_PREFIX": f"it{os.getpid()}.{data_dir.name}.",
            "SPENDLEDGER_LOG_LEVEL": "WARNING",
            **{f"SPENDLEDGER_{k.upper()}": v for k, v in settings.items()},
        }
    )
    system = EmbeddedSystem(
        data_dir=data_dir, port=free_port(), kafka_port=free_port(), env=env, say=lambda _: None
    )
    try:
        system.start()
        yield Ledger(system)
    finally:
        system.stop()
        for name in ("api", "sink", *system.worker_ports):
            log = system.log_dir / f"{name}.log"
            if log.exists():
                tail = log.read_text(errors="replace")[-3000:]
                if "Traceback" in tail or "ERROR" in tail:
                    print(f"--- {name}.log (tail) ---\n{tail}")


@pytest.fixture(scope="module")
def ledger(tmp_path_factory: Any) -> Iterator[Ledger]:
    with running_system(tmp_path_factory) as running:
        yield running
