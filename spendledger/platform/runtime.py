"""Process-wide tuning of the long-running services (API, worker, sink)."""

from __future__ import annotations

import gc


def tune_gc(thresholds: tuple[int, int, int]) -> None:
    """Collect garbage less often, and never scan what start-up built.

    With Python's defaults (700, 10, 10), a busy worker spent a tenth of its time collecting,
    with a pause at every full collection (docs/performance.md). The services make little
    cyclic garbage: their state is plain bytes, dicts and lists. So a young collection every 50,000 allocations, and rare full
    collections, keep memory flat. `gc.freeze` moves the objects of the imported modules
    to a generation that is never scanned.
    """
    gc.freeze()
    gc.set_threshold(*thresholds)
