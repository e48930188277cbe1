"""An event larger than a Kafka message may be is refused with 413 and the limit, not retried as 503."""

from typing import Any

from httpx import ASGITransport, AsyncClient

from tests.component.test_fuzz import PUBLISHER, build_app

APP = build_app()


async def post(body: Any) -> Any:
    headers = {"Authorization": "Bearer prod-key"}
    async with AsyncClient(transport=ASGITransport(app=APP), base_url="http://test") as http:
        return await http.post("/v1/events", json=body, headers=headers)


def event(n: int, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"kind": "request", "request_id": f"size-{n}", "model": "openai/gpt-4o"}
    if metadata:
        body["metadata"] = metadata
    return body


async def test_one_event_over_the_message_size_is_413_naming_it() -> None:
    before = len(PUBLISHER.sent)
    huge = event(1, {"notes": "x" * 2_000_000})  # 2 MB: under the body limit, over a Kafka message
    response = await post({"events": [event(0), huge]})
    assert response.status_code == 413, response.text
    error = response.json()["error"]
    assert error["code"] == "payload_too_large"
    assert error["details"]["index"] == 1 and error["details"]["limit_bytes"] == 900_000
    assert "retry-after" not in response.headers  # permanent: a client must not retry it as is
    assert len(PUBLISHER.sent) == before


async def test_a_large_batch_of_small_events_is_accepted() -> None:
    events = [event(n, {"notes": "y" * 3000}) for n in range(1000)]  # 3 MB in all, split into bundles
    response = await post({"events": events})
    assert response.status_code == 202, response.text
