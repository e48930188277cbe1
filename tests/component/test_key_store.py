"""`api_keys` in ClickHouse (chDB): keys round-trip hashed, and a revocation sticks whatever the
versions say (hosts' clocks differ)."""

from datetime import UTC, datetime
from typing import Any

from ingest.keys import ClickHouseKeyStore, KeyRing, StoredKey
from ledger.scopes import ApiKey, Binding


def test_a_key_round_trips_and_a_revocation_sticks(clickhouse: Any) -> None:
    client = clickhouse()
    store = ClickHouseKeyStore(client)
    ring = KeyRing({}, store).start()
    try:
        row, secret = ring.create(
            ApiKey("", "producer", "gw", Binding.of(["search"], [], ["team:*"]), 50), datetime.now(UTC)
        )
        ring.refresh()
        found = ring.find(secret)
        assert found is not None and found.binding.apps == frozenset({"search"}) and found.events_per_s == 50
        stored = client.query("SELECT key_hash FROM api_keys").result_rows
        assert stored and secret not in str(stored)

        assert ring.revoke(row.key.key_id, datetime.now(UTC)) is not None
        # The creating row saved again by a host whose clock runs ahead: the newest version.
        ahead = StoredKey(row.key, row.key_hash, row.created_at)
        client.insert(
            "api_keys",
            [
                [
                    row.key.key_id,
                    ahead.key_hash,
                    "producer",
                    "gw",
                    ["search"],
                    [],
                    ["team:*"],
                    50,
                    row.created_at,
                    None,
                    2**63,
                ]
            ],
            column_names=list(ClickHouseKeyStore._COLUMNS),
        )
        ring.refresh()
        assert ring.find(secret) is None
    finally:
        ring.stop()
