"""The ingest journal: every message the API acknowledged (events, budget changes), on local disk.

The embedded broker keeps its log in memory, so in the embedded system the data
directory is the durable copy: the API appends what it publishes to the journal
and fsyncs it before it answers (202 for events, 200 for a budget). At the next
start, what never landed in ClickHouse is published again (see
`spendledger.restore`); a segment whose messages all landed (or were rejected)
is deleted while the system runs.

Layout: `raw-<sequence>.log` segments, each a run of entries
`<u32 topic length><u32 key length><u32 value length or NONE><topic><key><value><u32 crc32>`
(the crc covers topic, key and value; NONE marks a tombstone). A torn entry at a
segment's end is a write that was never acknowledged (the answer waits for the
fsync), so a reader stops there.
"""

from __future__ import annotations

import os
import struct
import threading
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import IO

_HEAD = struct.Struct(">III")
_NONE = 0xFFFFFFFF
_CRC = struct.Struct(">I")
SEGMENT_GLOB = "raw-*.log"


Entry = tuple[str, bytes, bytes | None]  # topic, key, value (None: a tombstone)


class Journal:
    """Appends acknowledged messages (topic, key, value) to the current segment, durably.

    Group commit: appends from many threads write one after another, and one fdatasync covers every
    write made before it, so concurrent requests share a sync instead of queueing for one each.
    Locks are taken in one order, `_sync_lock` then `_lock`."""

    def __init__(self, directory: Path, *, segment_max_bytes: int = 64 * 1024 * 1024) -> None:
        self.directory = directory
        self.segment_max_bytes = segment_max_bytes
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock = threading.Lock()  # the file, its size and `_written`
        self._sync_lock = threading.Lock()  # one fdatasync at a time, and `_synced`
        self._file: IO[bytes] | None = None
        self._path: Path | None = None
        self._opened_at = 0.0
        self._size = 0
        self._written = 0  # bytes written since this journal was opened, across segments
        self._synced = 0  # of which surely on disk

    def append(self, topic: str, messages: Sequence[tuple[bytes, bytes | None]]) -> None:
        """Write the messages and fsync them; returns once they are on disk."""
        data = b"".join(_entry(topic, key, value) for key, value in messages)
        with self._lock:
            if self._file is None or self._size >= self.segment_max_bytes:
                self._file = self._open_next()
            try:
                self._file.write(data)
                self._file.flush()
            except OSError:
                self._close(
                    sync=False
                )  # a half-written entry ends this segment; the next append starts another
                raise
            self._size += len(data)
            self._written += len(data)
            mine = self._written
        with self._sync_lock:
            if self._synced >= mine:
                return  # a sync since our write covered it
            with self._lock:
                file, upto = self._file, self._written
            if file is None:  # closed (and synced) by a rotation since our write
                return
            try:
                os.fdatasync(file.fileno())
            except OSError:
                with self._lock:
                    if self._file is file:
                        self._close(sync=False)  # unsure what reached the disk: start a new segment
                raise
            self._synced = max(self._synced, upto)

    def rotate(self, min_age_s: float = 0.0) -> None:
        """Close the current segment (if it has entries and is old enough): the next append opens one."""
        with self._sync_lock, self._lock:
            if self._file is not None and self._size and time.monotonic() - self._opened_at >= min_age_s:
                self._close()

    def closed_segments(self) -> list[Path]:
        """Segments no longer written to, oldest first."""
        with self._lock:
            return [p for p in segments(self.directory) if p != self._path]

    def close(self) -> None:
        with self._sync_lock, self._lock:
            self._close()

    def _open_next(self) -> IO[bytes]:
        # Called with `_lock` held: a full segment is closed without waiting for a sync, which the
        # appends still owe theirs from the file they wrote to; it is synced as it closes.
        self._close()
        existing = segments(self.directory)
        number = _number(existing[-1]) + 1 if existing else 1
        path = self.directory / f"raw-{number:012d}.log"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        file = os.fdopen(fd, "ab")
        _sync_dir(self.directory)
        self._path, self._size, self._opened_at = path, 0, time.monotonic()
        return file

    def _close(self, *, sync: bool = True) -> None:
        if self._file is not None:
            if sync:
                os.fdatasync(self._file.fileno())
                self._synced = max(self._synced, self._written)
            self._file.close()
        self._file, self._path, self._size = None, None, 0


def segments(directory: Path) -> list[Path]:
    """The journal's segments, oldest first."""
    return sorted(directory.glob(SEGMENT_GLOB), key=_number) if directory.is_dir() else []


def read_segment(path: Path) -> list[Entry]:
    """The entries of a segment, up to its first torn or corrupt entry (see `is_whole`)."""
    return _scan(path.read_bytes())[0]


def is_whole(path: Path) -> bool:
    """True unless an entry inside the segment is corrupt (a torn last entry is an unanswered write)."""
    return not _scan(path.read_bytes())[1]


def _scan(data: bytes) -> tuple[list[Entry], bool]:
    """The intact entries from the start, and whether a corrupt entry (not a torn end) stopped them."""
    entries: list[Entry] = []
    at = 0
    while at + _HEAD.size <= len(data):
        topic_len, key_len, value_len = _HEAD.unpack_from(data, at)
        tombstone = value_len == _NONE
        end = at + _HEAD.size + topic_len + key_len + (0 if tombstone else value_len) + _CRC.size
        if end > len(data):
            break
        body = data[at + _HEAD.size : end - _CRC.size]
        if zlib.crc32(body) != _CRC.unpack_from(data, end - _CRC.size)[0]:
            return entries, True
        key_end = topic_len + key_len
        entries.append(
            (body[:topic_len].decode(), body[topic_len:key_end], None if tombstone else body[key_end:])
        )
        at = end
    return entries, False


def set_aside(path: Path) -> Path:
    """Keep a segment that did not read whole out of the journal's way, for a person to look at."""
    target = path.with_suffix(".damaged")
    path.rename(target)
    return target


def write_segment(directory: Path, entries: Sequence[Entry]) -> None:
    """A new segment holding these entries, on disk before it returns (used when carrying over)."""
    journal = Journal(directory)
    for topic, key, value in entries:
        journal.append(topic, [(key, value)])
    journal.close()


def remove(paths: Sequence[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)
    if paths:
        _sync_dir(paths[0].parent)


def _entry(topic: str, key: bytes, value: bytes | None) -> bytes:
    name = topic.encode()
    body = name + key + (value or b"")
    head = _HEAD.pack(len(name), len(key), _NONE if value is None else len(value))
    return head + body + _CRC.pack(zlib.crc32(body))


def _number(path: Path) -> int:
    return int(path.stem.split("-", 1)[1])


def _sync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
