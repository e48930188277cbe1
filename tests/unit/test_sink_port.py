"""`up` picks the sink's port when it starts it; one taken meanwhile (by any outgoing connection) is
replaced. Before: the sink exited with `Address already in use` and `up` failed (seen in a suite run)."""

from pathlib import Path
from typing import Any

import pytest

from spendledger import embedded
from spendledger.embedded import EmbeddedSystem
from spendledger.platform.errors import StartupError


def system_with(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ports: list[int], refusal: str) -> Any:
    system = EmbeddedSystem(data_dir=tmp_path, say=lambda _: None)
    system.log_dir.mkdir(parents=True)
    free = iter(ports)
    monkeypatch.setattr(embedded, "_free_port", lambda host: next(free))
    spawned: list[str] = []

    def spawn(name: str, env: dict[str, str]) -> None:
        spawned.append(env["SPENDLEDGER_SINK_PORT"])
        if len(spawned) == 1:  # the first sink dies at start
            with (system.log_dir / "sink.log").open("a") as log:
                log.write(f"Traceback …\nOSError: {refusal}\n")

    def wait_ready(checks: dict[str, str]) -> None:
        if len(spawned) == 1:
            raise StartupError("the sink exited with code 1")

    monkeypatch.setattr(system, "_spawn", spawn)
    monkeypatch.setattr(system, "_wait_ready", wait_ready)
    return system, spawned


def test_a_port_taken_before_the_sink_binds_it_is_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    system, spawned = system_with(tmp_path, monkeypatch, [41001, 41002], "[Errno 98] Address already in use")
    system._start_sink({})
    assert spawned == ["41001", "41002"] and system.sink_port == 41002
    assert "port 41001 was taken" in (system.log_dir / "supervisor.log").read_text()


def test_a_sink_that_fails_for_another_reason_stops_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    system, spawned = system_with(tmp_path, monkeypatch, [41001, 41002], "ClickHouse relay refused")
    with pytest.raises(StartupError):
        system._start_sink({})
    assert spawned == ["41001"]
