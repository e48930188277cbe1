"""`spendledger`: up | sql | demo | api | worker | sink | migrate (DESIGN §10)."""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from pydantic import SecretStr, ValidationError

from spendledger.platform.errors import SpendLedgerError
from spendledger.platform.settings import (
    ApiSettings,
    CommonSettings,
    Settings,
    SinkSettings,
    WorkerSettings,
)

DEFAULT_DATA_DIR = Path(".spendledger")
RUNNING_FILE = "api-url"  # written by `up`, read by `sql` to find the running API

# A server process reads the settings of its own class, and so checks only its own variables; the
# other commands read every one (`up` checks them all before it starts any process).
SERVER_SETTINGS: dict[str, type[CommonSettings]] = {
    "api": ApiSettings,
    "worker": WorkerSettings,
    "sink": SinkSettings,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="spendledger", description="Spend ledger for AI API usage.")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start the embedded system (broker, worker, API, sink) in the foreground")
    up.add_argument(
        "--host", default="127.0.0.1", help="the address every part listens on (default 127.0.0.1)"
    )
    up.add_argument("--port", type=int, default=8000, help="the API's and dashboard's port (default 8000)")
    up.add_argument(
        "--kafka-port", type=int, default=19092, help="the embedded Kafka broker's port (default 19092)"
    )
    up.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA_DIR,
        help=f"where the ledger, the journal, the dev keys and the logs are kept (default {DEFAULT_DATA_DIR})",
    )

    sql = sub.add_parser("sql", help="run a read-only ClickHouse query")
    sql.add_argument("query")
    sql.add_argument("--format", choices=("table", "json", "csv"), default="table")
    sql.add_argument(
        "--api-url", default=None, help="API to query through (default: the local one if running)"
    )
    sql.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)

    demo = sub.add_parser("demo", help="send realistic synthetic traffic to the running system")
    demo.add_argument("--events", type=int, default=5000, help="calls to send (default 5000)")
    demo.add_argument("--days", type=int, default=7, help="spread them over this many past days (default 7)")
    demo.add_argument("--seed", type=int, default=42)
    demo.add_argument("--api-url", default=None, help="the API (default: the local one `up` started)")
    demo.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)

    keys = sub.add_parser(
        "keys", help="create, list and revoke API keys (through the API, with an admin key)"
    )
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="create a key; it is printed once, only its hash is kept")
    create.add_argument("--scope", choices=("producer", "analyst", "admin"), required=True)
    create.add_argument("--name", default="", help="what the key is for")
    create.add_argument(
        "--app", action="append", default=[], help="bind a producer key to this app (repeatable)"
    )
    create.add_argument("--tenant", action="append", default=[], help="bind a producer key to this tenant")
    create.add_argument(
        "--tag", action="append", default=[], help="bind to a tag: key:value, or key:* (any value)"
    )
    create.add_argument(
        "--events-per-s", type=float, default=0, help="this key's rate limit (default: the API's)"
    )
    keys_sub.add_parser("list", help="list keys (never their secrets)")
    revoke = keys_sub.add_parser("revoke", help="revoke a key created through the API")
    revoke.add_argument("key_id")
    for command in keys_sub.choices.values():
        command.add_argument("--api-url", default=None, help="the API (default: the local one `up` started)")
        command.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)

    for name, text in (
        ("api", "serve the HTTP API"),
        ("worker", "run a Faust worker"),
        ("sink", "land attributed records in ClickHouse"),
        ("migrate", "apply the ClickHouse DDL"),
        ("restore", "carry budgets, spend and unlanded events into an empty broker (run by `up`)"),
    ):
        sub.add_parser(name, help=text)

    args = parser.parse_args(argv)
    try:
        settings = SERVER_SETTINGS.get(args.command, Settings)()
    except ValidationError as exc:
        print(f"error: invalid settings:\n{exc}", file=sys.stderr)
        return 2

    from spendledger.platform.logs import configure

    configure(settings.log_level)
    if args.command in SERVER_SETTINGS:
        from spendledger.platform.runtime import tune_gc

        tune_gc(settings.gc_thresholds)
    try:
        if not isinstance(settings, Settings):  # api, worker, sink
            serve(settings)
            return 0
        if args.command == "up":
            return cmd_up(args)
        if args.command == "sql":
            return cmd_sql(args, settings)
        if args.command == "demo":
            return cmd_demo(args, settings)
        if args.command == "keys":
            return cmd_keys(args, settings)
        if args.command == "restore":
            from spendledger.platform.clickhouse import connect, migrate
            from spendledger.restore import restore

            client = connect(settings)
            migrate(client)
            restore(settings, client, settings.journal_dir, lambda text: print(text, flush=True))
        elif args.command == "migrate":
            from ingest.sql_guard import PRIVATE_TABLES
            from spendledger.platform.clickhouse import connect, migrate, migrate_analyst

            client = connect(settings)
            for name in migrate(client):
                print(f"applied {name}")
            if migrate_analyst(client, settings, PRIVATE_TABLES):
                print(f"analyst user ready: {settings.clickhouse_analyst_user}")
    except SpendLedgerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def serve(settings: CommonSettings) -> None:
    """Run the server process these settings are for (SERVER_SETTINGS)."""
    if isinstance(settings, ApiSettings):  # before SinkSettings, which the API's include
        from spendledger.services import run_api

        run_api(settings)
    elif isinstance(settings, WorkerSettings):
        from processors.app import run_worker

        run_worker(settings)
    elif isinstance(settings, SinkSettings):
        from spendledger.services import run_sink

        run_sink(settings)
    else:
        raise TypeError(f"no server process reads {type(settings).__name__}")


def cmd_up(args: argparse.Namespace) -> int:
    from spendledger.embedded import EmbeddedSystem

    system = EmbeddedSystem(
        data_dir=args.data_dir, host=args.host, port=args.port, kafka_port=args.kafka_port, say=_say
    )
    stopping = False

    def on_signal(signum: int, _frame: Any) -> None:
        nonlocal stopping
        if stopping:
            system.abort_drain.set()
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    started = time.monotonic()
    try:
        system.start()
    except SpendLedgerError as exc:
        _say(f"error: {exc}")
        system.stop()
        return 1
    bootstrap = system.child_env["SPENDLEDGER_KAFKA_BOOTSTRAP"]
    (args.data_dir / RUNNING_FILE).write_text(system.api_url)
    _say(f"API:        {system.api_url}  (docs at {system.api_url}/docs)")
    dashboard = f"{system.api_url}/ui" + (f"#key={system.analyst_key}" if system.dev_keys else "")
    _say(f"Dashboard:  {dashboard}")
    _say(f"Kafka:      {bootstrap}")
    _say(f"ClickHouse: {system.child_env['SPENDLEDGER_CLICKHOUSE_DSN']}")
    _say(f"Logs:       {system.log_dir}/")
    _say(f"ready in {time.monotonic() - started:.1f}s; Ctrl-C to stop")
    if system.dev_keys:
        _say("In another shell, for the README's examples and the SDK:")
        _say(
            f"  export SPENDLEDGER_URL={system.api_url} SPENDLEDGER_API_KEY={system.producer_key} "
            f"PRODUCER_KEY={system.producer_key} ANALYST_KEY={system.analyst_key} ADMIN_KEY={system.admin_key}"
        )
    # A child that exits is restarted with backoff; each exit and restart is printed
    # and written to logs/supervisor.log.
    system.start_supervisor()
    while not stopping and system.failed is None:
        time.sleep(0.2)
    if system.failed is not None:
        _say(f"error: {system.failed}. Stopping.")
    _say(
        "stopping: new events are refused; waiting for what was acknowledged to land (Ctrl-C again: stop now)"
    )
    (args.data_dir / RUNNING_FILE).unlink(missing_ok=True)
    system.stop(drain_timeout_s=None if system.failed is not None else system.settings().drain_timeout_s)
    _say("stopped")
    return 1 if system.failed is not None else 0


def cmd_sql(args: argparse.Namespace, settings: Settings) -> int:
    """Through the running API in embedded mode (chDB allows one process), else straight to ClickHouse."""
    api_url = _api_url(args, settings)
    if settings.is_embedded_clickhouse and "SPENDLEDGER_CLICKHOUSE_DSN" not in os.environ:
        dsn = f"chdb://{(args.data_dir / 'clickhouse').resolve()}"
        settings = settings.model_copy(update={"clickhouse_dsn": SecretStr(dsn)})
    columns: list[str]
    rows: list[list[Any]]
    if args.api_url or settings.api_url or settings.is_embedded_clickhouse and _reachable(api_url):
        key = (
            settings.analyst_key_list() or settings.admin_key_list() or [_dev_key(args.data_dir, "analyst")]
        )[0]
        response = httpx.post(
            f"{api_url}/v1/sql",
            json={"query": args.query},
            headers={"Authorization": f"Bearer {key}"},
            timeout=120,
        )
        body = response.json()
        if response.status_code != 200:
            error = body.get("error", {})
            print(f"error: {error.get('code')}: {error.get('message')}", file=sys.stderr)
            return 1
        columns, rows = body["columns"], body["rows"]
    else:
        from ingest.errors import ApiError
        from ingest.sql import QueryLimits
        from spendledger.services import build_query_engine

        engine = build_query_engine(settings)
        limits = QueryLimits.of(settings)
        try:
            result = engine.query(args.query, limits)
        except ApiError as exc:
            print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
            return 1
        columns, rows = result.columns, result.rows
    print(render(columns, rows, args.format))
    return 0


def cmd_keys(args: argparse.Namespace, settings: Settings) -> int:
    """`keys create|list|revoke` through the API's /v1/keys (keys live hashed in ClickHouse)."""
    api_url = _api_url(args, settings)
    admin = (settings.admin_key_list() or [_dev_key(args.data_dir, "admin")])[0]
    headers = {"Authorization": f"Bearer {admin}"}
    if args.keys_command == "create":
        body = {
            "scope": args.scope,
            "name": args.name,
            "apps": args.app,
            "tenants": args.tenant,
            "tags": args.tag,
            "events_per_s": args.events_per_s,
        }
        response = httpx.post(f"{api_url}/v1/keys", json=body, headers=headers, timeout=30)
    elif args.keys_command == "list":
        response = httpx.get(f"{api_url}/v1/keys", headers=headers, timeout=30)
    else:
        response = httpx.post(f"{api_url}/v1/keys/{args.key_id}/revoke", headers=headers, timeout=30)
    answer = response.json()
    if response.status_code >= 400:
        error = answer.get("error", {})
        print(f"error: {error.get('code')}: {error.get('message')}", file=sys.stderr)
        return 1
    if args.keys_command == "create":
        print(f"key {answer['key_id']} ({answer['scope']}): {answer['key']}")
        print("keep it now: it is not shown again, only its hash is stored")
    elif args.keys_command == "list":
        columns = ["key_id", "scope", "source", "name", "apps", "tenants", "tags", "revoked_at"]
        rows = [[k.get(c, "") for c in columns] for k in answer["keys"]]
        print(render(columns, rows, "table"))
    else:
        print(f"revoked {answer['key_id']} at {answer['revoked_at']}")
    return 0


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    """Send `--events` synthetic calls in batches, with progress, and create a few budgets."""
    from datetime import UTC, datetime

    from spendledger.demo import BUDGETS, events

    if args.events < 1 or args.days < 1:
        print("error: --events and --days must be at least 1", file=sys.stderr)
        return 2
    api_url = _api_url(args, settings)
    if not _reachable(api_url):
        print(f"error: no API answers at {api_url}; start it with `spendledger up`", file=sys.stderr)
        return 1
    producer = (settings.producer_key_list() or [_dev_key(args.data_dir, "producer")])[0]
    admin = (settings.admin_key_list() or [_dev_key(args.data_dir, "admin")])[0]
    _say(f"==> sending {args.events:,} calls over the last {args.days} days to {api_url}")
    batch: list[dict[str, Any]] = []
    sent, started, shown = 0, time.monotonic(), 0.0
    with httpx.Client(base_url=api_url, timeout=60) as http:
        for n, event in enumerate(
            events(args.events, now=datetime.now(UTC), days=args.days, seed=args.seed), 1
        ):
            batch.append(event)
            if len(batch) == 500 or n == args.events:
                response = http.post(
                    "/v1/events", json={"events": batch}, headers={"Authorization": f"Bearer {producer}"}
                )
                if response.status_code != 202:
                    print(f"error: HTTP {response.status_code}: {response.text[:300]}", file=sys.stderr)
                    return 1
                sent += len(batch)
                batch = []
                if time.monotonic() - shown >= 1 or sent == args.events:
                    shown = time.monotonic()
                    _say(f"    {_bar(sent, args.events)} {sent:,} / {args.events:,} calls")
        _say("==> creating demo budgets")
        admin_headers = {"Authorization": f"Bearer {admin}"}
        for budget in BUDGETS:
            r = http.post("/tag/new", json=budget, headers=admin_headers)
            if r.status_code == 200:
                _say(
                    f"    {budget['name']}: ${budget['max_budget']} per {budget['budget_duration']} (created)"
                )
            elif r.status_code == 409:  # someone's own budget: say what it is, and keep it
                kept = http.get("/tag/info", params={"names": str(budget["name"])}, headers=admin_headers)
                info = kept.json().get(budget["name"], {}) if kept.status_code == 200 else {}
                top = info.get("max_budget")
                limit = "no maximum" if top is None else f"${top}"
                what = f"{limit} per {info.get('budget_duration')}" if info else "a budget"
                _say(f"    {budget['name']}: already there ({what}), kept as it is")
            else:
                _say(f"    {budget['name']}: not created (HTTP {r.status_code}: {r.text[:200]})")
    command = _command()
    _say(f"sent {sent:,} calls in {time.monotonic() - started:.1f}s; they land within a few seconds")
    _say(f"  dashboard: {api_url}/ui")
    _say(f"  reports:   {api_url}/docs#/analytics")
    query = "SELECT team, count(), sum(cost_usd) FROM spend_records GROUP BY team"
    _say(f'  try:       {command} sql "{query}"')
    return 0


def _command() -> str:
    """How this command was started (`.venv/bin/spendledger`, `python -m spendledger`), for hints to copy."""
    program = sys.argv[0] if sys.argv else ""
    if Path(program).name == "spendledger":
        return program
    python = os.path.relpath(sys.executable)
    return f"{sys.executable if python.startswith('..') else python} -m spendledger"


def _bar(done: int, total: int, width: int = 30) -> str:
    filled = round(width * done / total) if total else width
    return "[" + "#" * filled + "." * (width - filled) + "]"


def _api_url(args: argparse.Namespace, settings: Settings) -> str:
    running = args.data_dir / RUNNING_FILE
    local_url = (
        running.read_text().strip() if running.exists() else f"http://{settings.api_host}:{settings.api_port}"
    )
    return str(args.api_url or settings.api_url or local_url)


def render(columns: list[str], rows: list[list[Any]], fmt: str) -> str:
    if fmt == "json":
        return json.dumps([dict(zip(columns, row, strict=True)) for row in rows], indent=2)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(rows)
        return out.getvalue().rstrip("\n")
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    line = "-+-".join("-" * w for w in widths)
    lines = [" | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)), line]
    lines += [" | ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    lines.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def _reachable(api_url: str) -> bool:
    try:
        return httpx.get(f"{api_url}/healthz", timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


def _dev_key(data_dir: Path, kind: str) -> str:
    path = data_dir / "dev-keys.json"
    if not path.exists():
        variable = f"SPENDLEDGER_{kind.upper()}_KEYS"
        raise SpendLedgerError(f"no {kind} key: set {variable} (or run from the directory of `up`)")
    return str(json.loads(path.read_text())[kind])


def _say(text: str) -> None:
    print(text, flush=True)


if __name__ == "__main__":
    sys.exit(main())
