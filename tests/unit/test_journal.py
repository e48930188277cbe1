"""The ingest journal: what was appended is read back in order; a torn or corrupt tail ends a segment."""

import os
import stat
from pathlib import Path

import pytest

from spendledger.platform.journal import (
    Journal,
    is_whole,
    read_segment,
    remove,
    segments,
    set_aside,
    write_segment,
)


def test_appended_messages_come_back_in_order_with_their_topics_and_tombstones(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j")
    journal.append("spend.raw", [(b"r1", b'{"a":1}'), (b"r2", b'{"a":2}')])
    journal.append("spend.budgets", [(b"team:x", None), (b"team:y", b"")])
    journal.close()
    [path] = segments(tmp_path / "j")
    assert list(read_segment(path)) == [
        ("spend.raw", b"r1", b'{"a":1}'),
        ("spend.raw", b"r2", b'{"a":2}'),
        ("spend.budgets", b"team:x", None),
        ("spend.budgets", b"team:y", b""),
    ]


def test_the_journal_and_its_segments_are_private_to_the_owner(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j")
    journal.append("t", [(b"k", b"v")])
    [path] = journal.closed_segments() or segments(tmp_path / "j")
    assert stat.S_IMODE((tmp_path / "j").stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_torn_or_corrupt_tail_ends_the_segment_and_what_came_before_is_kept(tmp_path: Path) -> None:
    """A crash in the middle of a write leaves a partial entry: it was never acknowledged."""
    journal = Journal(tmp_path)
    journal.append("t", [(b"k1", b"v1"), (b"k2", b"v2")])
    journal.close()
    [path] = segments(tmp_path)
    whole = path.read_bytes()
    path.write_bytes(whole[:-3])
    assert list(read_segment(path)) == [("t", b"k1", b"v1")]
    assert is_whole(path)  # a torn end is an unanswered write, not damage
    corrupt = bytearray(whole)
    corrupt[-6] ^= 0xFF  # inside the second entry's value
    path.write_bytes(bytes(corrupt))
    assert list(read_segment(path)) == [("t", b"k1", b"v1")]
    assert not is_whole(path)
    assert set_aside(path).name.endswith(".damaged") and segments(tmp_path) == []


def test_a_failed_write_ends_its_segment_so_later_entries_are_not_hidden_behind_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = Journal(tmp_path)
    journal.append("t", [(b"k1", b"v1")])

    def full_disk(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fdatasync", full_disk)
    with pytest.raises(OSError):
        journal.append("t", [(b"k2", b"v2")])
    monkeypatch.undo()
    journal.append("t", [(b"k3", b"v3")])
    journal.close()
    # k2 reached the file but not for sure the disk: unanswered, harmless if replayed (same event id).
    assert [[key for _, key, _ in read_segment(p)] for p in segments(tmp_path)] == [[b"k1", b"k2"], [b"k3"]]


def test_rotation_closes_the_current_segment_and_the_next_append_opens_a_new_one(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.append("t", [(b"k1", b"v1")])
    assert journal.closed_segments() == []
    journal.rotate()
    journal.append("t", [(b"k2", b"v2")])
    [closed] = journal.closed_segments()
    assert list(read_segment(closed)) == [("t", b"k1", b"v1")]
    assert len(segments(tmp_path)) == 2
    remove([closed])
    assert len(segments(tmp_path)) == 1


def test_a_full_segment_is_followed_by_a_new_one(tmp_path: Path) -> None:
    journal = Journal(tmp_path, segment_max_bytes=50)  # each entry is 59 bytes
    for n in range(5):
        journal.append("t", [(b"k", b"x" * 40 + bytes([n]))])
    journal.close()
    found = [entry for path in segments(tmp_path) for entry in read_segment(path)]
    assert len(segments(tmp_path)) == 5
    assert [value[-1] for _, _, value in found if value] == [0, 1, 2, 3, 4]


def test_a_carried_over_segment_follows_the_existing_ones(tmp_path: Path) -> None:
    write_segment(tmp_path, [("a", b"1", b"x")])
    write_segment(tmp_path, [("b", b"2", None)])
    assert [list(read_segment(p)) for p in segments(tmp_path)] == [[("a", b"1", b"x")], [("b", b"2", None)]]
