"""Attribution: every seed example and header set -> expected canonical fields."""

import pytest

from ledger.tags import AttributionPolicy, hash_user_id, normalize


def cols(**kwargs):
    return normalize(**kwargs).columns()


def test_seed000_anyapi_headers():
    a = normalize(
        headers={
            "Authorization": "Bearer sk-live-abcdefghijklmnopqrstuv",
            "Content-Type": "application/json",
            "X-AnyAPI-App-ID": "my-chatbot-v2",
            "X-AnyAPI-App-Name": "Customer Support Bot",
            "X-AnyAPI-App-Version": "2.1.0",
            "X-AnyAPI-User-ID": "user_12345",
            "X-AnyAPI-Session-ID": "session_abc123",
        }
    )
    assert a.columns() == {
        "app_id": "my-chatbot-v2",
        "environment": "",
        "team": "",
        "project": "",
        "feature": "",
        "user_id": "user_12345",
        "session_id": "session_abc123",
        "tenant_id": "",
        "region": "",
        "app_version": "2.1.0",
        "app_name": "Customer Support Bot",
    }
    assert a.tags == ["app:my-chatbot-v2", "user:user_12345", "version:2.1.0"]
    assert a.invalid == []
    assert a.metadata == {}  # Authorization and Content-Type are not attribution


def test_seed000_body_metadata():
    c = cols(
        metadata=[
            {
                "app_id": "data-analyzer",
                "app_name": "Business Intelligence Tool",
                "app_version": "1.5.2",
                "user_id": "analyst_jane_doe",
                "project": "q4-sales-analysis",
                "department": "marketing",
                "region": "us-west",
            }
        ]
    )
    assert c["app_id"] == "data-analyzer"
    assert c["app_name"] == "Business Intelligence Tool"
    assert c["app_version"] == "1.5.2"
    assert c["user_id"] == "analyst_jane_doe"
    assert c["project"] == "q4-sales-analysis"
    assert c["team"] == "marketing"  # department is an alias of team
    assert c["region"] == "us-west"


def test_seed000_multi_tenant():
    a = normalize(
        headers={
            "X-AnyAPI-App-ID": "my-saas-platform-company-abc",
            "X-AnyAPI-App-Name": "SaaS App - company-abc",
            "X-AnyAPI-Tenant-ID": "company-abc",
        },
        metadata=[
            {
                "tenant_id": "company-abc",
                "subscription_tier": "enterprise",
                "feature_flags": ["advanced_analytics", "custom_models"],
                "billing_cycle": "monthly",
            }
        ],
    )
    assert a.dimensions["tenant"] == "company-abc"
    assert a.metadata == {
        "subscription_tier": "enterprise",
        "feature_flags": '["advanced_analytics","custom_models"]',
        "billing_cycle": "monthly",
    }
    assert a.invalid == []  # the same tenant twice is not a conflict


def test_seed001_tags_and_spend_logs_metadata():
    a = normalize(
        metadata=[
            {
                "tags": ["app:bi-tool", "env:production"],
                "spend_logs_metadata": {
                    "project": "q4-sales-analysis",
                    "department": "marketing",
                    "version": "1.5.2",
                },
            }
        ]
    )
    assert a.tags == [
        "app:bi-tool",
        "env:production",
        "project:q4-sales-analysis",
        "team:marketing",
        "version:1.5.2",
    ]


def test_seed001_litellm_headers_case_insensitive():
    a = normalize(
        headers={
            "X-LiteLLM-Tags": "app:my-chatbot,env:prod",
            "x-litellm-spend-logs-metadata": '{"project": "q4-analysis", "version": "2.0"}',
        }
    )
    assert a.dimensions == {
        "app": "my-chatbot",
        "env": "production",
        "project": "q4-analysis",
        "version": "2.0",
    }


def test_seed001_user_parameter_and_free_labels():
    a = normalize(
        metadata=[{"tags": ["app:saas-platform", "tenant:company-abc", "tier:enterprise", "beta"]}],
        users=["customer_54321"],
    )
    assert a.dimensions["user"] == "customer_54321"
    assert a.dimensions["tenant"] == "company-abc"
    assert "tier:enterprise" in a.tags and "beta" in a.tags


def test_seed003_xproxy_user_and_composite_ids():
    assert normalize(headers={"xProxy-User-ID": "user_123"}).dimensions["user"] == "user_123"
    assert normalize(users=["acme:alice"]).dimensions["user"] == "acme:alice"


@pytest.mark.parametrize(
    ("raw", "env"),
    [
        ("prod", "production"),
        ("PRD", "production"),
        ("stg", "staging"),
        ("stage", "staging"),
        ("dev", "development"),
        ("qa", "test"),
        ("canary", "canary"),
    ],
)
def test_env_aliases(raw, env):
    assert normalize(metadata=[{"tags": [f"env:{raw}"]}]).dimensions["env"] == env


@pytest.mark.parametrize(
    ("key", "dim"),
    [
        ("owner", "team"),
        ("cost_center", "team"),
        ("Cost-Center", "team"),
        ("use_case", "feature"),
        ("environment", "env"),
        ("customer_id", "tenant"),
    ],
)
def test_key_aliases(key, dim):
    assert normalize(metadata=[{key: "x1"}]).dimensions[dim] == "x1"


def test_precedence_headers_win_and_conflict_is_recorded():
    a = normalize(headers={"X-AnyAPI-App-ID": "from-header"}, metadata=[{"app_id": "from-body"}])
    assert a.dimensions["app"] == "from-header"
    assert a.invalid == ["conflict|app:from-body"]


@pytest.mark.parametrize(
    ("tag", "reason"),
    [
        ("team:", "empty_value"),
        ("team:" + "x" * 129, "too_long"),
        ('team:a"b', "bad_characters"),
        ("bad key!:v", "bad_key"),
        ("team:sk-abcdefghijklmnopqrstuvwxyz", "secret_redacted"),
    ],
)
def test_invalid_tags_are_recorded_not_dropped(tag, reason):
    a = normalize(metadata=[{"tags": [tag]}])
    assert len(a.invalid) == 1 and a.invalid[0].startswith(reason + "|")
    assert "sk-abcdef" not in a.invalid[0]


def test_user_id_rules():
    bad = normalize(users=["jane doe"])
    assert "user" not in bad.dimensions
    assert bad.invalid == ["bad_user_id|user:jane doe"]
    assert normalize(users=[12345]).dimensions["user"] == "12345"  # converted to a string


def test_too_many_tags():
    a = normalize(metadata=[{"tags": [f"l{i}:v" for i in range(60)]}], policy=AttributionPolicy(max_tags=50))
    assert len(a.labels) == 50
    assert len([i for i in a.invalid if i.startswith("too_many_tags|")]) == 10


def test_credential_values_redacted_in_metadata():
    a = normalize(
        metadata=[{"spend_logs_metadata": {"openai_api_key": "abc", "note": "Bearer abcdefghijklmnop"}}]
    )
    assert a.metadata == {"openai_api_key": "[REDACTED]", "note": "[REDACTED]"}


def test_user_id_hmac_hashing():
    key = b"k" * 32
    a = normalize(users=["customer_54321"], policy=AttributionPolicy(user_id_hmac_key=key))
    assert a.dimensions["user"] == hash_user_id("customer_54321", key)
    assert a.dimensions["user"].startswith("uh_") and "customer" not in a.dimensions["user"]
    assert hash_user_id("customer_54321", key) != hash_user_id("customer_54321", b"other")


def test_bad_litellm_metadata_json_is_recorded():
    assert normalize(headers={"x-litellm-spend-logs-metadata": "{not json"}).invalid == [
        "bad_json|x-litellm-spend-logs-metadata"
    ]
