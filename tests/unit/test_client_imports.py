"""The client (SDK, LiteLLM plugin, guard) imports nothing of the server: a producer installs it alone."""

import json
import subprocess
import sys

import pytest

SERVER = ["fastapi", "faust", "chdb", "clickhouse_connect", "genai_prices", "sqlglot", "uvicorn", "ingest",
          "processors", "spendledger.platform.settings", "spendledger.services", "ledger.pricing"]  # fmt: skip


@pytest.mark.parametrize(
    ("module", "also_allowed"),
    [
        ("spendledger.sdk", []),
        ("spendledger.sdk.asgi", []),
        (
            "spendledger.integrations.litellm",
            ["fastapi"],
        ),  # the proxy's own framework, imported on a refusal only
        ("spendledger.guard", []),
    ],
)
def test_a_client_module_loads_no_server_module(module: str, also_allowed: list[str]) -> None:
    script = (
        f"import json, sys, {module}\n"
        f"print(json.dumps(sorted(m for m in {SERVER!r} if m in sys.modules and m not in {also_allowed!r})))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )  # noqa: S603
    assert json.loads(done.stdout) == []
