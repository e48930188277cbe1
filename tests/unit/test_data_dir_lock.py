"""One embedded system per data dir: a second `up` would replay and prune the first one's journal."""

from pathlib import Path

import pytest

from spendledger.embedded import EmbeddedSystem
from spendledger.platform.errors import StartupError


def test_a_second_system_on_a_data_dir_in_use_is_refused_and_may_start_once_the_first_stops(
    tmp_path: Path,
) -> None:
    first, second = EmbeddedSystem(data_dir=tmp_path), EmbeddedSystem(data_dir=tmp_path)
    first._lock_data_dir()
    with pytest.raises(StartupError, match="in use by another"):
        second._lock_data_dir()
    first.stop()
    second._lock_data_dir()
    second.stop()
