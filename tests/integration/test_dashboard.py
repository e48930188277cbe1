"""`spendledger demo` fills the system; the /ui dashboard, rendered by headless Chromium, shows the API's figures.

Chromium is Debian's `chromium` package (`.ci/run` installs it). Without it the
test is skipped with the reason, unless SPENDLEDGER_REQUIRE_BROWSER=1 (CI sets
it), in which case it fails.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import Ledger

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parents[2]


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("SPENDLEDGER_REQUIRE_BROWSER") == "1":
        pytest.fail("no Chromium found, and SPENDLEDGER_REQUIRE_BROWSER=1 (install Debian's `chromium`)")
    pytest.skip("no Chromium found; install Debian's `chromium` package to run the dashboard test")


def render(browser: str, url: str, profile: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    # No background networking: on a closed network Chromium's own connections are refused at every start.
    command = [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
    command += ["--disable-quic", "--no-first-run", "--disable-background-networking"]
    command += ["--disable-component-update", "--disable-sync", f"--user-data-dir={profile}"]
    command += ["--virtual-time-budget=20000", "--window-size=1400,1100", "--hide-scrollbars", *flags, url]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)  # noqa: S603


class Figures(HTMLParser):
    """`data-figure` name -> the text shown inside that element."""

    def __init__(self) -> None:
        super().__init__()
        self.figures: dict[str, str] = {}
        self.body: dict[str, str] = {}
        self._open: list[tuple[str, str | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "body":
            self.body = {k: v or "" for k, v in values.items()}
        self._open.append((tag, values.get("data-figure")))
        if values.get("data-figure"):
            self.figures[values["data-figure"] or ""] = ""

    def handle_endtag(self, tag: str) -> None:
        while self._open:
            if self._open.pop()[0] == tag:
                break

    def handle_data(self, data: str) -> None:
        for _, figure in self._open:
            if figure:
                self.figures[figure] += data


def usd(value: Any) -> str:
    """The page's money format: the value as a double, to the cent, half up, with thousands commas."""
    cents = Decimal(float(value)).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)
    return f"${cents:,.2f}"


def pct(value: Any) -> str:
    return f"{Decimal(float(value)).quantize(Decimal('0.1'), rounding=ROUND_HALF_UP)}%"


def test_the_dashboard_shows_what_the_reports_api_says(ledger: Ledger, tmp_path: Path) -> None:
    browser = chromium()
    env = {
        **os.environ,
        "SPENDLEDGER_PRODUCER_KEYS": ledger.system.producer_key,
        "SPENDLEDGER_ADMIN_KEYS": ledger.system.admin_key,
    }
    # Someone's own budget under a name the demo uses: the demo says what it is and keeps it.
    own = {"name": "team:support", "max_budget": 100, "budget_duration": "1mo"}
    r = ledger.http.post("/tag/new", json=own, headers={"Authorization": f"Bearer {ledger.system.admin_key}"})
    assert r.status_code == 200, r.text
    demo = subprocess.run(  # noqa: S603
        [sys.executable, "-m", "spendledger", "demo", "--events", "3000", "--api-url", ledger.system.api_url],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert demo.returncode == 0, demo.stderr
    assert "3,000 / 3,000 calls" in demo.stdout and "team:search" in demo.stdout  # progress and budgets
    assert "team:support: already there ($100 per 1mo), kept as it is" in demo.stdout, demo.stdout
    python = os.path.relpath(sys.executable, ROOT)
    assert f'{python} -m spendledger sql "SELECT' in demo.stdout  # a hint that runs as printed, from the repo
    ledger.wait_for(
        "SELECT count() FROM spend_records WHERE startsWith(event_id, 'evt_demo_')", lambda r: r[0][0] >= 3000
    )

    today = datetime.now(UTC).date()
    span = {"start_date": (today - timedelta(days=6)).isoformat(), "end_date": today.isoformat()}
    admin = {"Authorization": f"Bearer {ledger.system.admin_key}"}

    def api(path: str, body: Any = None, **params: Any) -> Any:
        call = ledger.http.post if body is not None else ledger.http.get
        response = (
            call(path, json=body, params=params, headers=admin)
            if body is not None
            else call(path, params=params, headers=admin)
        )
        assert response.status_code == 200, response.text
        return json.loads(response.content, parse_float=Decimal)

    # The demo's small team:search budget is spent today: wait for its block and alerts to settle.
    def search_blocked() -> bool:
        return any(b["name"] == "team:search" and b["blocked"] for b in api("/tag/list"))

    deadline = datetime.now(UTC) + timedelta(seconds=60)
    while not search_blocked():
        assert datetime.now(UTC) < deadline, "team:search never blocked"
        time.sleep(0.25)
    alerts = ledger.wait_for(
        "SELECT count() FROM budget_events WHERE tag = 'team:search' AND event_type = 'alert'",
        lambda r: r[0][0] >= 4,  # thresholds 50, 80, 95 and 100
    )

    url = f"{ledger.system.api_url}/ui#key={ledger.system.admin_key}&start={span['start_date']}&end={span['end_date']}"
    page = render(browser, url, tmp_path / "profile-dom", "--dump-dom")
    assert page.returncode == 0, page.stderr[-2000:]
    parsed = Figures()
    parsed.feed(page.stdout)
    shown = parsed.figures
    assert parsed.body.get("data-loaded") == "true", page.stdout[-3000:]

    usage = api("/v1/analytics/usage", group_by="date", **span)
    assert shown["total_cost"] == usd(usage["total_cost"])
    assert shown["total_requests"] == f"{usage['total_requests']:,}"
    assert shown["unpriced_requests"] == f"{usage['unpriced_requests']:,}" != "0"
    assert shown["success_rate"] == pct(float(usage["success_rate"]) * 100)

    for by, key, label in (
        ("app_id", "apps", "app"),
        ("team", "teams", "team"),
        ("model", "models", "model"),
    ):
        report = api(
            "/v1/analytics/cost-allocation", {**span, "group_by": [by], "metrics": ["requests", "cost"]}
        )
        groups = report[key][:8]
        assert groups, key
        for group in groups:
            name = group[by] if group[by] is not None else "(untagged)"
            assert shown[f"{label}:{name}:requests"] == f"{group['requests']:,}"
            expected = "unpriced" if group["unpriced_requests"] == group["requests"] else usd(group["cost"])
            assert shown[f"{label}:{name}:cost"] == expected, (label, name)
    assert "team:(untagged):cost" in shown and shown["model:acme/llama-internal-70b:cost"] == "unpriced"

    budgets = api("/tag/list")
    assert {b["name"] for b in budgets} >= {"team:support", "team:search", "team:data"}
    for budget in budgets:
        assert shown[f"budget:{budget['name']}:spend"] == usd(budget["spend"])
        assert shown[f"budget:{budget['name']}:max"] == usd(budget["max_budget"])
        assert (f"budget:{budget['name']}:blocked" in shown) == budget["blocked"]
        if budget["projected_spend"] is not None and not budget["blocked"]:
            # The projection moves with the clock between our read and the page's: within 5 %.
            figure = Decimal(shown[f"budget:{budget['name']}:projected"].strip("$").replace(",", ""))
            assert abs(figure - Decimal(str(budget["projected_spend"]))) <= Decimal(
                str(budget["projected_spend"])
            ) / 20 + Decimal("0.01")

    coverage = api("/v1/analytics/coverage", **span)
    for dimension in coverage["dimensions"]:
        d = dimension["dimension"]
        assert shown[f"coverage:{d}:requests_pct"] == pct(dimension["requests_pct"])
        assert shown[f"coverage:{d}:untagged_requests"] == f"{dimension['untagged']['requests']:,}"
        assert shown[f"coverage:{d}:untagged_cost"] == usd(dimension["untagged"]["cost"])
        assert shown[f"coverage:{d}:alert"] == ("below 95%" if dimension["alert"] else "ok")

    assert shown["budget:team:search:blocked"] == "blocked"
    [[recent]] = ledger.sql(
        "SELECT count() FROM (SELECT 1 FROM budget_events WHERE event_type IN ('alert', 'soft_alert', 'projected_alert', 'blocked') "
        "ORDER BY at DESC LIMIT 10)"
    )
    assert shown["alerts:count"] == f"({recent})" and recent >= alerts[0][0]

    screenshot = tmp_path / "dashboard.png"
    shot = render(browser, url, tmp_path / "profile-shot", f"--screenshot={screenshot}")
    assert shot.returncode == 0, shot.stderr[-2000:]
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 20_000
    if os.environ.get("SPENDLEDGER_SCREENSHOT_DIR"):
        shutil.copy(screenshot, Path(os.environ["SPENDLEDGER_SCREENSHOT_DIR"]) / "dashboard.png")
