"""`spendledger demo` fills the system; the /ui dashboard, rendered by headless Chromium, shows the API's figures.

Chromium is Debian's `chromium` package (`.ci/run` installs it). Without it the
test is skipped with the reason, unless SPENDLEDGER_REQUIRE_BROWSER=1 (CI sets
it), in which case it fails.
"""

import csv
import io
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
from urllib.parse import unquote

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
    """`data-figure` name -> the text shown inside that element; `data-export` name -> its CSV rows;
    `data-drill` name -> where the row's link goes; the chart's days."""

    def __init__(self) -> None:
        super().__init__()
        self.figures: dict[str, str] = {}
        self.exports: dict[str, list[list[str]]] = {}
        self.drills: dict[str, str] = {}
        self.days: list[str] = []
        self.body: dict[str, str] = {}
        self._open: list[tuple[str, str | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "body":
            self.body = {k: v or "" for k, v in values.items()}
        href = values.get("href") or ""
        if values.get("data-export") and href.startswith("data:text/csv"):
            text = unquote(href.split(",", 1)[1]).removeprefix("\ufeff")  # the BOM Excel needs
            self.exports[values["data-export"] or ""] = list(csv.reader(io.StringIO(text)))
        if values.get("data-drill"):
            self.drills[values["data-drill"] or ""] = href
        if values.get("data-day"):
            self.days.append(values["data-day"] or "")
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
    """The page's money format: the exact value to the cent, half up, with thousands commas; below a cent,
    two significant digits."""
    exact = Decimal(str(value))
    if exact != 0 and abs(exact) < Decimal("0.01"):
        if abs(exact) < Decimal("0.000001"):
            return "<$0.000001"
        digits = exact.quantize(Decimal(1).scaleb(exact.adjusted() - 1), rounding=ROUND_HALF_UP)
        if digits.adjusted() > exact.adjusted():  # 0.0099999 -> 0.010, two digits still
            digits = digits.quantize(Decimal(1).scaleb(digits.adjusted() - 1))
        return f"${digits:f}"
    cents = exact.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)
    return f"${cents:,.2f}"


def test_money_below_a_cent_shows_its_digits() -> None:
    assert [usd(v) for v in ("0.0045", "0.00027", "0.0000004", "0", "1234.565", "0.01", "1.005", "0.0099999")] == [
        "$0.0045", "$0.00027", "<$0.000001", "$0.00", "$1,234.57", "$0.01", "$1.01", "$0.010",
    ]  # fmt: skip


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
        timeout=240,
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

    # One call too small for cents: the page shows what it cost. And a model named like a spreadsheet
    # formula: its CSV cell must stay text.
    tiny = {"kind": "completed", "request_id": "tiny-1", "model": "openai/gpt-4o-mini",
            "headers": {"X-AnyAPI-App-ID": "tiny-app"}, "usage": {"input_tokens": 1000, "output_tokens": 200}}  # fmt: skip
    formula = {**tiny, "request_id": "formula-1", "model": "=HYPERLINK(1)", "provider": "acme"}
    assert ledger.send({"events": [tiny, formula]}).status_code == 202
    ledger.wait_for("SELECT count() FROM spend_records WHERE app_id = 'tiny-app'", lambda r: r[0][0] == 2)

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

    zero = {"name": "team:zero", "max_budget": 0, "budget_duration": "1d"}
    assert ledger.http.post("/tag/new", json=zero, headers=admin).status_code == 200

    # The demo's small team:search budget is spent today: wait for its block and alerts to settle.
    def search_blocked() -> bool:
        return any(b["name"] == "team:search" and b["blocked"] for b in api("/tag/list"))

    deadline = datetime.now(UTC) + timedelta(seconds=60)
    while not search_blocked():
        assert datetime.now(UTC) < deadline, "team:search never blocked"
        time.sleep(0.25)
    ledger.wait_for(
        "SELECT count() FROM budget_events WHERE tag = 'team:search' AND event_type = 'alert'",
        lambda r: r[0][0] >= 4,  # thresholds 50, 80, 95 and 100
    )

    crossings_sql = (
        "SELECT tag, event_type, threshold_pct, count() FROM budget_events WHERE event_type IN "
        "('alert', 'soft_alert', 'projected_alert', 'blocked') GROUP BY tag, window_start, event_type, threshold_pct"
    )
    ledger.settle()  # every signal so far has landed; a projection may still cross while the page loads
    crossings_before = len(ledger.sql(crossings_sql))
    base = f"{ledger.system.api_url}/ui#key={ledger.system.admin_key}&start={span['start_date']}&end={span['end_date']}"
    shown, parsed = page_figures(browser, base, tmp_path / "profile-dom")

    usage = api("/v1/analytics/usage", group_by="date", **span)
    assert shown["total_cost"] == usd(usage["total_cost"])
    assert shown["total_requests"] == f"{usage['total_requests']:,}"
    assert shown["unpriced_requests"] == f"{usage['unpriced_requests']:,}" != "0"
    assert shown["success_rate"] == pct(float(usage["success_rate"]) * 100)
    # A continuous time axis: every day of the range, empty ones too (the demo's traffic spans 7 days).
    assert parsed.days == [(today - timedelta(days=6 - n)).isoformat() for n in range(7)]
    assert shown["chart:days"] == "(7 days)"
    fortnight = f"{ledger.system.api_url}/ui#key={ledger.system.admin_key}&start={today - timedelta(days=13)}&end={today}"
    _, longer = page_figures(browser, fortnight, tmp_path / "profile-14")
    assert len(longer.days) == 14 and longer.figures["chart:days"] == "(14 days)"  # the empty week too

    groups = check_tables(shown, parsed, api, span, {})
    assert "team:(untagged):cost" in shown and shown["model:acme/llama-internal-70b:cost"] == "unpriced"
    assert groups
    assert shown["app:tiny-app:cost"] == "$0.00027"  # below a cent: its digits, not $0.00
    assert ["'=HYPERLINK(1)", "1", "1"] in [[row[0], row[1], row[3]] for row in parsed.exports["models"]]

    budgets = api("/tag/list")
    assert {b["name"] for b in budgets} >= {"team:support", "team:search", "team:data"}
    for budget in budgets:
        name = budget["name"]
        assert shown[f"budget:{name}:spend"] == usd(budget["spend"])
        assert shown[f"budget:{name}:max"] == usd(budget["max_budget"])
        spend, top = float(budget["spend"]), float(budget["max_budget"])
        used = spend / top * 100 if top > 0 else (100.0 if spend > 0 else 0.0)
        assert shown[f"budget:{name}:pct_used"] == pct(used)
        assert (
            shown[f"budget:{name}:window"]
            == f"{budget['window_start'][:10]} → {budget['budget_reset_at'][:10]}"
        )
        assert shown[f"budget:{name}:reset"] == budget["budget_reset_at"][:16].replace("T", " ") + " UTC"
        assert (f"budget:{name}:blocked" in shown) == budget["blocked"]
        if budget["projected_spend"] is not None and not budget["blocked"]:
            # The projection moves with the clock between our read and the page's: within 5 %.
            figure = Decimal(shown[f"budget:{name}:projected"].strip("$").replace(",", ""))
            assert abs(figure - Decimal(str(budget["projected_spend"]))) <= Decimal(
                str(budget["projected_spend"])
            ) / 20 + Decimal("0.01")
    assert shown["budget:team:zero:pct_used"] == "0.0%"  # a $0 budget: no division by zero

    coverage = api("/v1/analytics/coverage", **span)
    for dimension in coverage["dimensions"]:
        d = dimension["dimension"]
        assert shown[f"coverage:{d}:requests_pct"] == pct(dimension["requests_pct"])
        assert shown[f"coverage:{d}:cost_pct"] == pct(dimension["cost_pct"])
        assert shown[f"coverage:{d}:untagged_requests"] == f"{dimension['untagged']['requests']:,}"
        assert shown[f"coverage:{d}:untagged_cost"] == usd(dimension["untagged"]["cost"])
        assert shown[f"coverage:{d}:alert"] == ("below 95%" if dimension["alert"] else "ok")
    assert [row[0] for row in parsed.exports["coverage"][1:]] == [
        d["dimension"] for d in coverage["dimensions"]
    ]

    # Alerts, one row per crossing: however often a threshold was signalled, it is one line.
    assert shown["budget:team:search:blocked"] == "blocked"
    crossings = ledger.sql(crossings_sql)
    assert shown["alerts:count"] in {f"({min(10, n)})" for n in range(crossings_before, len(crossings) + 1)}
    # team:search was signalled at 50, 80, 95 and 100 % (each maybe more than once): four crossings.
    assert sorted(int(c[2]) for c in crossings if c[0] == "team:search" and c[1] == "alert") == [
        50,
        80,
        95,
        100,
    ]
    listed = [(r[1], r[2], r[3]) for r in parsed.exports["alerts"][1:]]
    assert len(listed) == len(set(listed))  # no crossing twice
    assert ("team:search", "alert", "100") in listed

    # The cost-allocation export: app -> model, every row, exact figures.
    report = api(
        "/v1/analytics/cost-allocation",
        {**span, "group_by": ["app_id", "model"], "metrics": ["requests", "cost", "tokens"]},
    )
    flat = [[a["app_id"] or "", a["app_name"], as_text(m["model"] or ""), str(m["requests"]), str(m["cost"]), str(m["tokens"])]
            for a in report["apps"] for m in a["models"]]  # fmt: skip
    assert [row[:6] for row in parsed.exports["allocation"][1:]] == flat

    # Drill-down: the teams' rows lead to the page narrowed to a team; its apps lead further.
    assert parsed.drills["team:search"].endswith("team=search") and "start=" in parsed.drills["team:search"]
    narrowed, deeper = page_figures(browser, base + "&team=search", tmp_path / "profile-team")
    team_usage = api("/v1/analytics/usage", group_by="date", team="search", **span)
    assert narrowed["total_cost"] == usd(team_usage["total_cost"]) != shown["total_cost"]
    assert narrowed["total_requests"] == f"{team_usage['total_requests']:,}"
    check_tables(narrowed, deeper, api, span, {"team": "search"})
    assert set(deeper.exports["teams"][1:][0][:1]) == {"search"} and len(deeper.exports["teams"]) == 2
    app = deeper.exports["apps"][1][0]
    assert deeper.drills[f"app:{app}"].endswith(f"team=search&app_id={app}")
    narrower, _ = page_figures(browser, base + f"&team=search&app_id={app}", tmp_path / "profile-app")
    both = api("/v1/analytics/usage", group_by="date", team="search", app_id=app, **span)
    assert narrower["total_requests"] == f"{both['total_requests']:,}"
    # The untagged bucket is a drill-down too.
    untagged, _ = page_figures(browser, base + "&team=", tmp_path / "profile-untagged")
    [[no_team]] = ledger.sql(
        f"SELECT count() FROM spend_records WHERE team = '' AND occurred_at >= '{span['start_date']}' "
        f"AND occurred_at < toDate('{span['end_date']}') + 1"
    )
    assert untagged["total_requests"] == f"{no_team:,}" != narrowed["total_requests"]
    # A feature is a drill-down too (it narrows every figure).
    feature = parsed.exports["features"][1][0]
    assert parsed.drills[f"feature:{feature}"].endswith(f"feature={feature}")
    by_feature, _ = page_figures(browser, base + f"&feature={feature}", tmp_path / "profile-feature")
    one = api("/v1/analytics/usage", group_by="date", feature=feature, **span)
    assert by_feature["total_requests"] == f"{one['total_requests']:,}" != shown["total_requests"]

    for name, url in (("dashboard", base), ("dashboard-team", base + "&team=search")):
        screenshot = tmp_path / f"{name}.png"
        shot = render(browser, url, tmp_path / f"profile-shot-{name}", f"--screenshot={screenshot}")
        assert shot.returncode == 0, shot.stderr[-2000:]
        assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 20_000
        if os.environ.get("SPENDLEDGER_SCREENSHOT_DIR"):
            shutil.copy(screenshot, Path(os.environ["SPENDLEDGER_SCREENSHOT_DIR"]) / f"{name}.png")


def page_figures(browser: str, url: str, profile: Path) -> tuple[dict[str, str], Figures]:
    page = render(browser, url, profile, "--dump-dom")
    assert page.returncode == 0, page.stderr[-2000:]
    parsed = Figures()
    parsed.feed(page.stdout)
    assert parsed.body.get("data-loaded") == "true", page.stdout[-3000:]
    return parsed.figures, parsed


def as_text(cell: str) -> str:
    """A CSV cell as the page writes it: one a spreadsheet would run as a formula starts with '."""
    if cell[:1] in ("=", "+", "-", "@", "\t", "\r"):
        try:
            float(cell)
        except ValueError:
            return "'" + cell
    return cell


def check_tables(
    shown: dict[str, str], parsed: Figures, api: Any, span: dict[str, str], narrowed: dict[str, str]
) -> list[dict[str, Any]]:
    """The apps, teams, features and models tables and their CSV exports equal the API's allocation."""
    everything = []
    for by, key, label in (("app_id", "apps", "app"), ("team", "teams", "team"), ("feature", "features", "feature"),
                           ("model", "models", "model")):  # fmt: skip
        report = api(
            "/v1/analytics/cost-allocation",
            {**span, **narrowed, "group_by": [by], "metrics": ["requests", "cost"]},
        )
        groups = report[key]
        assert groups, key
        for group in groups[:8]:
            name = group[by] if group[by] is not None else "(untagged)"
            assert shown[f"{label}:{name}:requests"] == f"{group['requests']:,}"
            expected = "unpriced" if group["unpriced_requests"] == group["requests"] else usd(group["cost"])
            assert shown[f"{label}:{name}:cost"] == expected, (label, name)
        exported = parsed.exports[key]
        assert exported[0] == [by, "requests", "cost_usd", "unpriced_requests"]
        assert exported[1:] == [
            [as_text(g[by] or ""), str(g["requests"]), str(g["cost"]), str(g["unpriced_requests"])]
            for g in groups
        ], key
        everything += groups
    return everything
