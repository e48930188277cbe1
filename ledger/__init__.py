"""The pure domain core: attribution, usage, pricing, joins. No I/O, no clock reads; money is Decimal.

Import from the modules (`ledger.tags`, `ledger.pricing`, …): this package imports none of them, so a
client that needs one module does not load the others' dependencies (genai-prices for pricing).
"""
