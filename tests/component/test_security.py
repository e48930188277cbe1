"""Scopes: a producer key reaches only the producer endpoints; every other route needs the admin key."""

from typing import Any

import pytest
from httpx import ASGITransport, AsyncClient

from tests.component.test_fuzz import build_app

PUBLIC = {"/healthz", "/readyz", "/metrics", "/ui"}
PRODUCER_ROUTES = {("POST", "/v1/events"), ("POST", "/v1/check")}
APP = build_app()
ROUTES = sorted(
    (method.upper(), path)
    for path, operations in APP.openapi()["paths"].items()
    if path not in PUBLIC
    for method in operations
)


def test_every_route_is_classified() -> None:
    assert (
        len(ROUTES) == 14
    )  # events, check, sql, 5 budget, 2 limit and 4 report routes: a new one must be classified
    assert PRODUCER_ROUTES <= set(ROUTES)


async def call(method: str, path: str, key: str | None) -> Any:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    url = path.replace("{app_id}", "some-app")
    async with AsyncClient(transport=ASGITransport(app=APP), base_url="http://test") as http:
        return await http.request(method, url, headers=headers, json={})


@pytest.mark.parametrize(("method", "path"), [r for r in ROUTES if r not in PRODUCER_ROUTES])
async def test_a_producer_key_cannot_reach_admin_routes(method: str, path: str) -> None:
    response = await call(method, path, "prod-key")
    assert response.status_code == 403 and response.json()["error"]["code"] == "forbidden"


@pytest.mark.parametrize(("method", "path"), ROUTES)
@pytest.mark.parametrize("key", [None, "wrong-key", "prod-key-but-longer", "admin-ke"])
async def test_no_key_or_a_wrong_one_is_refused_everywhere(method: str, path: str, key: str | None) -> None:
    response = await call(method, path, key)
    assert response.status_code == 401 and response.json()["error"]["code"] == "unauthenticated"
