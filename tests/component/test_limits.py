"""Every input limit of `POST /v1/events`, each with its own clear error, checked with generated inputs.

Shape limits refuse the request (413/422, nothing published). Attribution limits never refuse
spend: the event is accepted, the tag or key over the limit is not recorded, and the 202 says
which and why (`warnings`), by the same rules the worker applies.
"""

from typing import Any

import orjson
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.app import Services, create_app
from ingest.publisher import InMemoryPublisher
from ledger.attribute import Attributor
from ledger.join import on_event
from ledger.pricing import PriceBook
from schemas.events import (
    MAX_BATCH_EVENTS,
    MAX_HEADER_VALUE_CHARS,
    MAX_HEADERS,
    MAX_ID_CHARS,
    MAX_METADATA_KEYS,
)
from spendledger.platform.settings import Settings

MAX_BODY = 1_000_000
PUBLISHER = InMemoryPublisher()
SETTINGS = Settings.model_validate(
    {"producer_keys": "prod-key", "admin_keys": "admin-key", "max_body_bytes": MAX_BODY, "topic_prefix": "t."}
)
CLIENT = TestClient(create_app(Services(settings=SETTINGS, publisher=PUBLISHER, queries=None)))
POLICY = SETTINGS.attribution_policy()
EXAMPLES = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def event(**extra: Any) -> dict[str, Any]:
    return {
        "kind": "completed",
        "request_id": "req-1",
        "model": "openai/gpt-4o",
        "usage": {"prompt_tokens": 10, "completion_tokens": 2},
        **extra,
    }


def post(body: Any = None, content: bytes | None = None) -> Any:
    PUBLISHER.sent.clear()
    return CLIENT.post("/v1/events", json=body, content=content, headers={"Authorization": "Bearer prod-key"})


def refused(r: Any, status: int, code: str, *words: str) -> dict[str, Any]:
    """The request was refused with this status and code, in a message naming `words`, and published nothing."""
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code, error
    for word in words:
        assert word in error["message"], (word, error["message"])
    assert error["message"].endswith("nothing was published") or status == 413
    assert PUBLISHER.sent == []
    return dict(error)


# ---------------------------------------------------------------- refused at the door


@EXAMPLES
@given(st.integers(MAX_BATCH_EVENTS + 1, 2 * MAX_BATCH_EVENTS))
def test_a_batch_over_the_limit_is_refused_naming_the_limit(n: int) -> None:
    refused(post({"events": [event()] * n}), 422, "invalid_event", "events", str(MAX_BATCH_EVENTS), str(n))


@EXAMPLES
@given(st.integers(1, 2 * MAX_BODY))
def test_a_body_over_the_limit_is_refused_with_the_limit_in_bytes(extra: int) -> None:
    body = orjson.dumps(event(metadata={"note": "x" * (MAX_BODY + extra)}))
    error = refused(post(content=body), 413, "payload_too_large", str(MAX_BODY))
    assert error["details"] == {"limit_bytes": MAX_BODY}


@EXAMPLES
@given(st.integers(MAX_HEADERS + 1, 3 * MAX_HEADERS))
def test_too_many_headers_are_refused(n: int) -> None:
    headers = {f"x-anyapi-k{i}": "v" for i in range(n)}
    refused(post(event(headers=headers)), 422, "invalid_event", "headers", f"at most {MAX_HEADERS} headers")


@EXAMPLES
@given(
    st.integers(1, 3 * MAX_HEADER_VALUE_CHARS),
    st.sampled_from(["x-anyapi-team", "x-litellm-tags", "X-Custom"]),
)
def test_a_header_value_over_the_limit_is_refused_naming_the_header(extra: int, name: str) -> None:
    r = post(event(headers={name: "v" * (MAX_HEADER_VALUE_CHARS + extra)}))
    refused(r, 422, "invalid_event", repr(name), str(MAX_HEADER_VALUE_CHARS))


@EXAMPLES
@given(st.integers(MAX_METADATA_KEYS + 1, 3 * MAX_METADATA_KEYS))
def test_too_many_metadata_keys_are_refused(n: int) -> None:
    metadata = {f"k{i}": i for i in range(n)}
    refused(post(event(metadata=metadata)), 422, "invalid_event", "metadata", str(MAX_METADATA_KEYS))


@EXAMPLES
@given(st.integers(MAX_ID_CHARS + 1, 4 * MAX_ID_CHARS), st.sampled_from(["request_id", "event_id"]))
def test_an_id_over_the_limit_is_refused_naming_the_field(length: int, field: str) -> None:
    refused(post(event(**{field: "r" * length})), 422, "invalid_event", field, str(MAX_ID_CHARS))


@EXAMPLES
@given(st.integers(0, 20), st.integers(1, 30))
def test_in_a_batch_the_message_names_the_first_bad_event_and_counts_the_rest(good: int, bad: int) -> None:
    events = [event(request_id=f"ok-{i}") for i in range(good)] + [
        event(request_id="bad id") for _ in range(bad)
    ]
    error = refused(post({"events": events}), 422, "invalid_event", f"events[{good}].request_id")
    assert len(error["details"]) == bad
    if bad > 1:
        assert f"and {bad - 1} more" in error["message"]


# ---------------------------------------------------------------- accepted, with what is not recorded


def accepted_with_warnings(body: Any) -> list[dict[str, Any]]:
    r = post(body)
    assert r.status_code == 202, r.text
    answer = r.json()
    assert len(PUBLISHER.sent) == answer["accepted"]  # the spend is never refused over a tag
    problems = [p for w in answer["warnings"] for p in w["problems"]]
    return problems


def recorded_invalid_tags(body: dict[str, Any]) -> list[str]:
    """What the worker records in `invalid_tags` for the event as published."""
    published = orjson.loads(PUBLISHER.sent[0][2])
    step = on_event(None, published, partition=0, now_ms=0)
    [record] = [Attributor(POLICY, PriceBook()).record(call) for call in step.emitted]
    return list(record.invalid_tags)


@EXAMPLES
@given(st.integers(POLICY.max_tags + 1, 3 * POLICY.max_tags))
def test_tags_over_the_limit_are_accepted_and_each_dropped_tag_is_named(n: int) -> None:
    body = event(metadata={"tags": [f"label-{i}" for i in range(n)]})
    problems = accepted_with_warnings(body)
    assert [p["input"] for p in problems] == [f"label-{i}" for i in range(POLICY.max_tags, n)]
    assert {p["reason"] for p in problems} == {"too_many_tags"}
    assert str(POLICY.max_tags) in problems[0]["message"] and "not recorded" in problems[0]["message"]
    assert len(recorded_invalid_tags(body)) == len(problems)  # the same rules as the worker's


@EXAMPLES
@given(st.integers(1, 500), st.sampled_from(["team", "feature", "customer"]))
def test_a_tag_value_over_the_limit_is_named_and_not_recorded(extra: int, key: str) -> None:
    body = event(metadata={"tags": [f"{key}:" + "v" * (POLICY.max_value_chars + extra)]})
    [problem] = accepted_with_warnings(body)
    assert problem["reason"] == "too_long" and problem["input"].startswith(f"{key}:")
    assert len(problem["input"]) <= 80 and str(POLICY.max_value_chars) in problem["message"]
    assert recorded_invalid_tags(body)[0].startswith("too_long|")


@EXAMPLES
@given(st.integers(1, 5000))
def test_a_metadata_value_over_the_limit_is_cut_and_named(extra: int) -> None:
    body = event(metadata={"note": "n" * (POLICY.max_metadata_value_chars + extra)})
    [problem] = accepted_with_warnings(body)
    assert problem == {
        "reason": "metadata_truncated",
        "input": "note",
        "message": f"metadata values are at most {POLICY.max_metadata_value_chars} characters: this one was cut there",
    }


@EXAMPLES
@given(st.integers(POLICY.max_metadata_keys + 1, MAX_METADATA_KEYS))
def test_metadata_keys_over_the_ledger_limit_are_named(n: int) -> None:
    problems = accepted_with_warnings(event(metadata={f"k{i}": i for i in range(n)}))
    assert [p["input"] for p in problems] == [f"k{i}" for i in range(POLICY.max_metadata_keys, n)]
    assert all(str(POLICY.max_metadata_keys) in p["message"] for p in problems)


@EXAMPLES
@given(st.sampled_from(["Team Name", "9" * 70, "ключ"]), st.text(min_size=1, max_size=20))
def test_a_bad_metadata_key_is_named(key: str, value: str) -> None:
    problems = accepted_with_warnings(event(metadata={key: value}))
    assert [p["reason"] for p in problems] == ["bad_key"] or key == "Team Name"  # spaces read as '_': valid


def test_warnings_can_be_turned_off_for_high_volume_producers() -> None:
    body = event(metadata={"tags": ["team:" + "v" * 500]})
    PUBLISHER.sent.clear()
    r = CLIENT.post("/v1/events?warnings=false", json=body, headers={"Authorization": "Bearer prod-key"})
    assert r.status_code == 202 and r.json()["warnings"] == [] and len(PUBLISHER.sent) == 1
    assert accepted_with_warnings(body) != []  # on by default


def test_a_credential_in_a_tag_is_never_echoed_back() -> None:
    secret = "sk-proj-abcdefghijklmnopqrstuvwxyz0123456789"
    r = post(event(metadata={"tags": [f"team:{secret}"]}))
    assert r.status_code == 202 and secret not in r.text
    assert "secret_redacted" in r.text


# ---------------------------------------------------------------- anything at all


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=30,
)
FIELDS = st.fixed_dictionaries(
    {},
    optional={
        "kind": st.sampled_from(["request", "usage", "completed", "other"]) | JSON,
        "request_id": st.from_regex(r"[A-Za-z0-9._:\-/]{1,20}", fullmatch=True) | JSON,
        "model": st.text(max_size=40) | JSON,
        "headers": st.dictionaries(st.text(max_size=20), st.text(max_size=40), max_size=5) | JSON,
        "metadata": st.dictionaries(st.text(max_size=20), JSON, max_size=5) | JSON,
        "user": JSON,
        "usage": st.dictionaries(
            st.sampled_from(["prompt_tokens", "completion_tokens", "input_tokens"]), JSON
        )
        | JSON,
        "occurred_at": st.datetimes().map(lambda d: d.isoformat() + "Z") | JSON,
    },
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(FIELDS, min_size=1, max_size=4) | FIELDS.map(lambda e: [e]))
def test_any_event_is_accepted_whole_or_refused_whole_with_a_code_and_a_message(events: list[Any]) -> None:
    r = post({"events": events})
    assert r.status_code in (202, 400, 413, 422), r.text
    if r.status_code == 202:
        answer = r.json()
        assert answer["accepted"] == len(events) == len(PUBLISHER.sent)
        for warning in answer["warnings"]:
            assert 0 <= warning["index"] < len(events)
            assert all(p["reason"] and p["message"] for p in warning["problems"])
    else:
        error = r.json()["error"]
        assert error["code"] and error["message"] and PUBLISHER.sent == []
