"""Keys through the real system: `spendledger keys` creates a bound producer key through the API,
ClickHouse keeps it (hashed) across the ring's refresh, it lands events within its binding and is
refused outside it, and a revocation shuts it out."""

import os
import subprocess
import sys
import time
import uuid

import pytest

from tests.integration.conftest import Ledger

pytestmark = pytest.mark.integration


def keys_cli(ledger: Ledger, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPENDLEDGER_")}
    env["SPENDLEDGER_ADMIN_KEYS"] = ledger.system.admin_key
    done = subprocess.run(  # noqa: S603 - our own CLI
        [sys.executable, "-m", "spendledger", "keys", *args, "--api-url", ledger.system.api_url],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_cli_key_is_stored_bound_and_revocable(ledger: Ledger) -> None:
    run = uuid.uuid4().hex[:8]
    out = keys_cli(
        ledger, "create", "--scope", "producer", "--name", "it", "--app", f"app{run}", "--tag", f"team:{run}"
    )
    line = out.splitlines()[0]  # "key key_… (producer): sl_producer_…"
    key_id, key = line.split()[1], line.rsplit(" ", 1)[1]
    assert key.startswith("sl_producer_") and "not shown again" in out
    time.sleep(3)  # past the ring's refresh: the key now comes back from ClickHouse

    headers = {"Authorization": f"Bearer {key}"}

    def event(n: int, tags: str) -> dict[str, object]:
        return {
            "kind": "completed",
            "request_id": f"{run}-{n}",
            "model": "openai/gpt-4o",
            "usage": {"prompt_tokens": 1000, "completion_tokens": 200},
            "headers": {"x-anyapi-app-id": f"app{run}", "x-litellm-tags": tags},
        }

    assert ledger.http.post("/v1/events", json=event(1, f"team:{run}"), headers=headers).status_code == 202
    refused = ledger.http.post("/v1/events", json=event(2, "team:victim"), headers=headers)
    assert refused.status_code == 403 and refused.json()["error"]["details"]["field"] == "tags"
    # A bound key's ids live in its own namespace: `<key_id>/<id>`.
    rows = ledger.wait_for(
        f"SELECT request_id, team, cost_usd FROM spend_records WHERE startsWith(request_id, '{key_id}/')",
        lambda rows: len(rows) >= 1,
    )
    assert rows == [[f"{key_id}/{run}-1", run, "0.004500000000"]]

    listing = keys_cli(ledger, "list")
    assert key_id in listing and key not in listing
    assert "revoked" in keys_cli(ledger, "revoke", key_id)
    assert ledger.http.post("/v1/events", json=event(3, f"team:{run}"), headers=headers).status_code == 401
    # Key hashes are not analysts' data.
    r = ledger.http.post(
        "/v1/sql",
        json={"query": "SELECT key_hash FROM api_keys"},
        headers={"Authorization": f"Bearer {ledger.system.admin_key}"},
    )
    assert r.status_code == 400
