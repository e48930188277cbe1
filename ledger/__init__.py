"""The pure domain core: attribution, usage, pricing, joins. No I/O, no clock reads; money is Decimal."""

from ledger.attribute import Attributor
from ledger.errors import JoinError, LedgerError, PriceFileError, UsageError
from ledger.join import JoinedCall, JoinStep, JoinTimeouts, PendingCall, next_tick_ms, on_event, on_tick
from ledger.pricing import Price, PriceBook, PriceOverride, parse_price_overrides
from ledger.tags import Attribution, AttributionPolicy, normalize
from ledger.usage import TokenUsage, parse_usage

__all__ = [
    "Attribution",
    "AttributionPolicy",
    "Attributor",
    "JoinError",
    "JoinStep",
    "JoinTimeouts",
    "JoinedCall",
    "LedgerError",
    "PendingCall",
    "Price",
    "PriceBook",
    "PriceFileError",
    "PriceOverride",
    "TokenUsage",
    "UsageError",
    "next_tick_ms",
    "normalize",
    "on_event",
    "on_tick",
    "parse_price_overrides",
    "parse_usage",
]
