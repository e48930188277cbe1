"""Errors of the process layer (I/O edges), translated from third-party exceptions."""


class SpendLedgerError(Exception):
    """Root of the process-layer errors."""


class StorageUnavailable(SpendLedgerError):
    """ClickHouse cannot be reached or opened."""


class BrokerUnavailable(SpendLedgerError):
    """Kafka cannot be reached, or did not acknowledge in time."""


class StartupError(SpendLedgerError):
    """The embedded system could not start one of its parts."""
