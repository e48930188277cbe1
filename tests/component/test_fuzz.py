"""Schema-driven fuzzing of the whole API (schemathesis over the OpenAPI document, positive and negative cases).

The app runs with the in-memory publisher (Kafka's twin: it records every
message), budget twins, and the real ClickHouse engine (chDB) behind /v1/sql and
the reports. For every generated request:
- never a 5xx;
- a rejected request (4xx) publishes nothing to Kafka;
- every 4xx carries `{"error": {"code", "message"}}` with a readable message.
The cases tried are counted and printed (docs/reliability.md reports them).
"""

from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode

from ingest.analytics import ClickHouseReports
from ingest.app import Services, create_app
from ingest.budget_desk import BudgetServices, SpendWindow
from ingest.keys import MemoryKeyStore
from ingest.publisher import InMemoryPublisher
from ingest.sql import ClickHouseQueryEngine
from ledger.tags import AttributionPolicy
from schemas.budgets import BudgetDefinition
from spendledger.guard import BudgetGuard, CompactedView
from spendledger.platform.settings import Settings

NOW = datetime(2026, 11, 22, 12, tzinfo=UTC)
TRIED: Counter[str] = Counter()
EXAMPLES_PER_OPERATION = 100


class ZeroSpend:
    def spend(self, tag: str, start: datetime, end: datetime) -> Decimal:
        return Decimal(0)

    def spends(self, windows: Sequence[SpendWindow]) -> dict[SpendWindow, Decimal]:
        return dict.fromkeys(windows, Decimal(0))

    def app_name(self, app_id: str) -> str:
        return ""


class Late:
    """Stores whose ClickHouse client is opened by a fixture (chDB's directory is a session fixture)."""

    client: Any = None

    def rows(self, sql: str, parameters: Any) -> Any:
        return ClickHouseReports(self.client, 10).rows(sql, parameters)

    def query(self, sql: str, limits: Any) -> Any:
        return ClickHouseQueryEngine(self.client).query(sql, limits)

    def ping(self) -> bool:
        return True


LATE = Late()
PUBLISHER = InMemoryPublisher()


def build_app() -> Any:
    registry = CompactedView({}, "spend.budgets", BudgetDefinition.model_validate_json)
    registry.mark_current()
    guard = BudgetGuard({}, "spend.budget-blocks")
    guard.view.mark_current()
    budgets = BudgetServices(
        registry, guard, ZeroSpend(), ZoneInfo("UTC"), AttributionPolicy(), clock=lambda: NOW, answer_wait_s=0
    )
    config = Settings.model_validate(
        {"producer_keys": "prod-key", "analyst_keys": "analyst-key", "admin_keys": "admin-key"}
    )
    return create_app(
        Services(
            settings=config,
            publisher=PUBLISHER,
            queries=LATE,
            budgets=budgets,
            reports=LATE,
            key_store=MemoryKeyStore(),
        )
    )


# Built at import: schemathesis' fixture-based loader does not work with this pytest.
schema = schemathesis.openapi.from_asgi("/openapi.json", build_app())
schema.config.generation.update(
    modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], max_examples=EXAMPLES_PER_OPERATION
)


@pytest.fixture(autouse=True)
def ledger_database(clickhouse: Any) -> None:
    if LATE.client is None:
        LATE.client = clickhouse()


@schema.parametrize()
@settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_no_request_gets_a_5xx_and_a_rejected_one_publishes_nothing(case: Any) -> None:
    publisher = PUBLISHER
    before = len(publisher.sent)
    response = case.call(headers={"Authorization": "Bearer admin-key"})
    TRIED[case.operation.label] += 1
    TRIED["5xx"] += response.status_code >= 500
    assert response.status_code < 500, (case.method, case.path, response.text[:500])
    if response.status_code >= 400:
        assert len(publisher.sent) == before, "a rejected request published to Kafka"
        error = response.json()["error"]
        assert error["code"] and isinstance(error["message"], str) and len(error["message"]) >= 10, error


def test_fuzz_summary() -> None:
    operations = {k: v for k, v in TRIED.items() if k != "5xx"}
    print(f"\nfuzz: {sum(operations.values())} cases over {len(operations)} operations, {TRIED['5xx']} 5xx")
    assert TRIED["5xx"] == 0
