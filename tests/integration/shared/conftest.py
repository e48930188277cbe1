"""One running system for the modules of this folder, started for the first and stopped after the last.

A module belongs here when it neither stops the system nor changes its settings, and when every
count it asserts is scoped to its own run (its ids, apps or tags), never to what other modules sent.
"""

from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.conftest import Ledger, running_system


@pytest.fixture(scope="package")
def ledger(tmp_path_factory: Any) -> Iterator[Ledger]:
    with running_system(tmp_path_factory) as running:
        yield running
