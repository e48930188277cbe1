"""Errors the ledger core raises. Edges translate them (HTTP 4xx, dead letter)."""


class LedgerError(Exception):
    """Root of every error the ledger core raises."""


class UsageError(LedgerError):
    """A usage object that cannot be turned into token counts."""


class PriceFileError(LedgerError):
    """A price-override file that does not parse or breaks a rule."""


class JoinError(LedgerError):
    """A raw event that cannot take part in a join (e.g. no request_id)."""


class BudgetError(LedgerError):
    """A budget definition that breaks a rule (duration, amounts, thresholds, window)."""
