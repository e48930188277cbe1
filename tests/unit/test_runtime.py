import gc

import pytest
from pydantic import ValidationError

from spendledger.platform.runtime import tune_gc
from spendledger.platform.settings import Settings


@pytest.fixture
def restore_gc():
    before = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*before)


def test_tune_gc_sets_the_thresholds_and_freezes_what_exists(restore_gc):
    kept = [object() for _ in range(3)]
    tune_gc((12_345, 20, 30))
    assert gc.get_threshold() == (12_345, 20, 30)
    assert gc.get_freeze_count() >= len(kept)


def test_gc_thresholds_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("SPENDLEDGER_GC_THRESHOLDS", "[700,10,10]")
    assert Settings().gc_thresholds == (700, 10, 10)
    assert Settings.model_fields["gc_thresholds"].default == (50_000, 50, 100)


def test_gc_thresholds_must_be_positive(monkeypatch):
    monkeypatch.setenv("SPENDLEDGER_GC_THRESHOLDS", "[0,10,10]")
    with pytest.raises(ValidationError, match="positive"):
        Settings()
