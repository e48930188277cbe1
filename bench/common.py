"""Shared by the benchmarks: an embedded system in a temporary directory, and machine facts."""

from __future__ import annotations

import os
import platform
import socket
import sys
import tempfile
from collections.abc import Iterator
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
        env = {k: v for k, v in os.environ.items() if not k.startswith("SPENDLEDGER_")}
        env.update(env_overrides)
        system = EmbeddedSystem(
            Path(tmp), port=free_port(), kafka_port=free_port(), env=env, say=lambda _: None
        )
        print("starting the embedded system…", flush=True)
        system.start()
        try:
            yield system
        finally:
            system.stop()


def machine() -> str:
    return f"machine: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, Python {platform.python_version()}"
