"""Process-wide tuning of the long-running services (API, worker, sink)."""

from __future__ import annotations

import gc


def tune_gc(thresholds: tuple[int, int, int]) -> None:
    """Collect garbage less often, and never scan what start-up built.

    With Python's defaults (700, 10, 10), a worker at 2,000 events/s ran about 40 young
    collections a second and a full one every three seconds. Together they took a tenth of
    its time, and each full collection stopped it for about 0.2 s (docs/performance.md). The services make little cyclic garbage: their state is plain
    bytes, dicts and lists. So a young collection every 50,000 allocations, and rare full
    collections, keep memory flat. `gc.freeze` moves the objects of the imported modules
    to a generation that is never scanned.
    """
    gc.freeze()
    gc.set_threshold(*thresholds)
