"""Restart policy for the embedded system's children: exponential backoff, forgiven after a stable run.

Pure: the caller passes the time in. `EmbeddedSystem.supervise()` applies it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

BASE_BACKOFF_S = 1.0
MAX_BACKOFF_S = 30.0
STABLE_AFTER_S = 60.0  # a child that ran this long before it died starts again from the base backoff


@dataclass
class ChildRecord:
    started_at: float
    restarts: int = 0  # in a row, without a stable run between them
    total_restarts: int = 0
    restart_at: float | None = None  # set while a restart is pending


@dataclass
class RestartPolicy:
    """When each exited child may start again."""

    base_s: float = BASE_BACKOFF_S
    max_s: float = MAX_BACKOFF_S
    stable_after_s: float = STABLE_AFTER_S
    children: dict[str, ChildRecord] = field(default_factory=dict)

    def started(self, name: str, now: float) -> None:
        record = self.children.setdefault(name, ChildRecord(started_at=now))
        record.started_at, record.restart_at = now, None

    def exited(self, name: str, now: float) -> float:
        """Record an exit; returns the delay before the restart."""
        record = self.children.setdefault(name, ChildRecord(started_at=now))
        if record.restart_at is not None:
            return max(0.0, record.restart_at - now)
        if now - record.started_at >= self.stable_after_s:
            record.restarts = 0
        delay = min(self.max_s, self.base_s * 2**record.restarts)
        record.restarts += 1
        record.total_restarts += 1
        record.restart_at = now + delay
        return delay

    def due(self, name: str, now: float) -> bool:
        record = self.children.get(name)
        return record is not None and record.restart_at is not None and now >= record.restart_at

    def total_restarts(self, name: str) -> int:
        record = self.children.get(name)
        return record.total_restarts if record else 0
