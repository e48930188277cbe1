"""Shared by the benchmarks: an embedded system in a temporary directory, and machine facts."""

from __future__ import annotations

import os
import platform
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spendledger.embedded import EmbeddedSystem  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def embedded_system(**env_overrides: str) -> Iterator[EmbeddedSystem]:
    """The whole system on free ports in a temporary data dir, stopped on exit."""
    with tempfile.TemporaryDirectory() as tmp:
        env = clean_env(**env_overrides)
        system = EmbeddedSystem(
            Path(tmp), port=free_port(), kafka_port=free_port(), env=env, say=lambda _: None
        )
        print("starting the embedded system…", flush=True)
        try:
            system.start()
            yield system
        finally:
            system.stop()


def clean_env(**overrides: str) -> dict[str, str]:
    """This environment without the caller's own SPENDLEDGER_ settings, plus `overrides`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPENDLEDGER_")}
    env["SPENDLEDGER_KEY_EVENTS_PER_S"] = "0"  # the benchmarks measure capacity, not the per-key limit
    env.update(overrides)
    return env


@contextmanager
def progress(label: str, total: int) -> Iterator[Callable[[int], None]]:
    """Prints `label: done / total (rate/s)` at most once a second, and a last line at the end
    (`total` 0: no total known)."""
    started = time.perf_counter()
    shown_at = [0.0]
    last = [0, -1]  # latest count, count last shown

    def show(done: int) -> None:
        elapsed = time.perf_counter() - started
        rate = done / elapsed if elapsed > 0 else 0.0
        of = f" / {total:,}" if total else ""
        print(f"  {label}: {done:>10,}{of}  ({rate:,.0f}/s, {elapsed:.0f} s)", flush=True)
        shown_at[0], last[1] = time.perf_counter(), done

    def tick(done: int) -> None:
        last[0] = done
        if time.perf_counter() - shown_at[0] >= 1.0:
            show(done)

    yield tick
    if last[1] != last[0]:
        show(last[0])


def machine() -> str:
    return f"machine: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, Python {platform.python_version()}"
