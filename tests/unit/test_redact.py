"""The credential rule set (`ledger.redact`): every shape and key name it must catch, and the
ordinary values it must leave alone. All credentials here are fakes of the real shapes."""

import re

import pytest

from ledger.redact import (
    REDACTED,
    is_secret_key,
    looks_like_secret,
    redact_identifier,
    redact_text,
    redact_value,
    stand_in,
)
from ledger.tags import normalize

PEM = (
    "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA0Z3VS5JJcds3xfn/ygWyF8PbnGy0AHB7MhgwMbRvI0MBZhpF\n"
    "-----END RSA PRIVATE KEY-----"
)
JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkphbmUifQ."
    "SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"
)


@pytest.mark.parametrize(
    "value",
    [
        # OpenAI (legacy, project, service account), Anthropic, OpenRouter
        "sk-" + "T3BlbkFJabcdefghijklmnopqrstuvwxyz0123456789AB",
        "sk-proj-" + "Xy7kQ2mN9pL4rT6vW8zB1cD3fG5hJ0aS",
        "sk-svcacct-" + "Ab12Cd34Ef56Gh78Ij90Kl12",
        "sk-ant-api03-" + "AbCdEfGhIjKlMnOpQrStUvWxYz0123456789",
        "sk-or-v1-" + "0123456789abcdef0123456789abcdef",
        # Stripe, live and test, secret and restricted; webhook secrets
        "sk_live_" + "4eC39HqLyjWDarjtT1zdp7dc",
        "sk_test_" + "4eC39HqLyjWDarjtT1zdp7dc",
        "rk_live_" + "51HxYzAbCdEfGhIjKlMnOpQr",
        "rk_test_" + "51HxYzAbCdEfGhIjKlMnOpQr",
        "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "hf_" + "aBcDeFgHiJkLmNoPqRsTuVwXyZ01234567",  # Hugging Face
        "glpat-" + "x8Yz1AbCdEfGhIjKlMnO",  # GitLab
        "ghp_" + "aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789",  # GitHub classic
        "gho_" + "aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789",
        "github_pat_" + "11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJ",
        "xoxb-" + "123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx",  # Slack
        "xoxp-" + "123456789012-123456789012-123456789012-abcdef0123456789abcdef0123456789",
        "xapp-1-" + "A0123456789-0123456789012-abcdef",
        "https://hooks.slack.com/services/" + "T00000000/B00000000/XXXXXXXXXXXXXXXXXXXXXXXX",
        "AKIA" + "IOSFODNN7EXAMPLE",  # AWS access key ids
        "ASIA" + "JEXAMPLEXEG2JICE",
        "AIza" + "SyA-abcdefghijklmnopqrstuvwxyz01234",  # Google
        "ya29." + "a0AfH6SMBxyzabcdefghijklmnop",
        "GOCSPX-" + "AbCdEfGhIjKlMnOpQrStUvWx",
        "gsk_" + "AbCdEfGhIjKlMnOpQrStUvWxYz0123456789abcdefghij",  # Groq
        "xai-" + "AbCdEfGhIjKlMnOpQrStUvWxYz0123456789abcdefghij",
        "pplx-" + "AbCdEfGhIjKlMnOpQrStUvWxYz0123456789abcdefghij",
        "r8_" + "AbCdEfGhIjKlMnOpQrStUvWxYz0123456789a",
        "npm_" + "AbCdEfGhIjKlMnOpQrStUvWxYz0123456789",
        "SG." + "ngeVfQFYQlKU0ufo8x5d1A.TwL2iGABf9DHoTf-09kqeF8tAmbihYzrnopKc-1s5cr",
        JWT,
        "bearer " + "abcDEF1234567890ghijKLM",  # HTTP credentials, in any case
        "Bearer " + "abcDEF1234567890ghijKLM",
        "BEARER " + "abcDEF1234567890ghijKLM",
        "Basic " + "dXNlcm5hbWU6cGFzc3dvcmQ=",
        "basic " + "dXNlcm5hbWU6cGFzc3dvcmQ=",
        "postgres://user:password@db:5432/x",  # URLs with a password
        "redis://:hunter2@cache:6379/0",
        "https://admin:s3cret@internal.example.com/api",
        "mongodb+srv://app:pw1234@cluster0.example.net/db",
        PEM,
        "-----BEGIN OPENSSH PRIVATE KEY-----",
        "-----BEGIN PGP PRIVATE KEY BLOCK-----",
        "-----BEGIN EC PRIVATE KEY-----",
        # a credential-named key inside the string
        "pwd:hunter2",
        "password=hunter2",
        "db_pwd: hunter2",
        "https://api.example.com/v1?api_key=abc123&x=1",
        '{"token": "abc123"}',
        "Authorization: Bearer abc",
        # inside other text
        "my key is sk-proj-Xy7kQ2mN9pL4rT6vW8zB1cD3fG5hJ0aS, use it",
        "team:sk-abcdefghijklmnopqrstuvwxyz",
    ],
)
def test_credential_shapes_are_caught(value):
    assert looks_like_secret(value)
    assert redact_text(value) == REDACTED


@pytest.mark.parametrize(
    "value",
    [
        "gpt-4o",
        "gpt-4o-mini",
        "openai/gpt-4o-mini",
        "claude-3-5-sonnet-20241022",
        "anthropic/claude-3-5-sonnet-20241022",
        "us.anthropic.claude-3-5-sonnet-20241022-v2:0",
        "ft:gpt-4o-mini-2024-07-18:my-org::9xYz1234",
        "meta-llama/Llama-3.1-8B-Instruct",
        "gemini-2.5-pro",
        "sk-",
        "sk-short",
        "req_abc123",
        "evt_0123456789abcdef01234567",
        "3f2b9c1e-7d4a-4e6b-9a0f-1c2d3e4f5a6b",
        "chatcmpl-9xYzAbCdEfGhIjKlMnOpQrStUvWx",
        "msg_01XFDUDYJgAACzvnptvVoYEL",
        "team:platform",
        "env:prod",
        "feature:summarize",
        "support-bot",
        "Platform Team",
        "eu-west-1",
        "task-management-service-prod",
        "disk-encrypted-volume-1234567",
        "https://api.openai.com/v1/chat/completions",
        "postgres://db:5432/ledger",
        "https://user@example.com/x",
        "2026-12-01T10:00:00Z",
        "max_tokens:100",
        "prompt_tokens=5",
        "token_type: bearer",
        "the bearer of news",
        "Basic plan",
        "success",
        "hf_small",
        "AKIA",
        "redacted-0123456789abcdef",
        REDACTED,
        f"pwd:{REDACTED}",
        "",
    ],
)
def test_ordinary_values_are_kept(value):
    assert not looks_like_secret(value)
    assert redact_text(value) == value


@pytest.mark.parametrize(
    "key",
    [
        "password",
        "Password",
        "PASSWORD",
        "passwd",
        "passphrase",
        "pwd",
        "db_pwd",
        "DB-PWD",
        "userPwd",
        "pass",
        "db_pass",
        "dbpassword",
        "secret",
        "client_secret",
        "clientSecret",
        "awsSecretAccessKey",
        "aws_secret_access_key",
        "aws_key",
        "AWS_KEY",
        "api_key",
        "apiKey",
        "ApiKey",
        "API-KEY",
        "x-api-key",
        "api.key",
        "apikey",
        "openai_api_key",
        "stripe_key",
        "private_key",
        "privateKey",
        "access_key",
        "Ocp-Apim-Subscription-Key",
        "token",
        "access_token",
        "accessToken",
        "id_token",
        "refresh_token",
        "x-api-token",
        "auth_token",
        "session_token",
        "x-amz-security-token",
        "bearer_token",
        "authorization",
        "Proxy-Authorization",
        "cookie",
        "Set-Cookie",
        "auth",
        "x-auth",
        "basic_auth",
        "credentials",
        "creds",
        "signature",
        "x-amz-signature",
        "jwt",
        "otp",
    ],
)
def test_credential_names_are_caught(key):
    assert is_secret_key(key)
    assert redact_value(key, "anything") == REDACTED


@pytest.mark.parametrize(
    "key",
    [
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "input_tokens",
        "output_tokens",
        "cache_read_input_tokens",
        "cache_creation_input_tokens",
        "input_tokens_details",
        "output_tokens_details",
        "prompt_tokens_details",
        "cached_tokens",
        "reasoning_tokens",
        "promptTokenCount",
        "candidatesTokenCount",
        "totalTokenCount",
        "thoughtsTokenCount",
        "cachedContentTokenCount",
        "inputTokens",
        "max_tokens",
        "token_count",
        "token_type",
        "tokenizer",
        "key",
        "cache_key",
        "idempotency_key",
        "partition_key",
        "public_key",
        "keyboard",
        "author",
        "bypass",
        "passenger",
        "team",
        "user",
        "user_id",
        "session_id",
        "request_id",
        "event_id",
        "model",
        "metadata",
        "spend_logs_metadata",
        "tags",
        "usage",
        "body",
        "x-anyapi-app-id",
        "x-litellm-tags",
    ],
)
def test_ordinary_names_are_kept(key):
    assert not is_secret_key(key)
    assert redact_value(key, "ordinary") == "ordinary"


def test_usage_counts_survive_and_a_key_inside_usage_does_not():
    usage = {
        "prompt_tokens": 1200,
        "completion_tokens": 300,
        "total_tokens": 1500,
        "prompt_tokens_details": {"cached_tokens": 200},
        "completion_tokens_details": {"reasoning_tokens": 40},
        "cache_read_input_tokens": 10,
        "promptTokenCount": 7,
        "api_key": "sk-proj-" + "Xy7kQ2mN9pL4rT6vW8zB1cD3fG5hJ0aS",
    }
    assert redact_value("usage", usage) == {**usage, "api_key": REDACTED}


def test_under_a_credential_name_every_string_and_number_goes_and_the_shape_stays():
    value = {
        "credentials": {"user": "bob", "pin": 1234, "scopes": ["read", "write"], "rotated": True},
        "n": 5,
    }
    assert redact_value("metadata", value) == {
        "credentials": {"user": REDACTED, "pin": REDACTED, "scopes": [REDACTED, REDACTED], "rotated": True},
        "n": 5,
    }
    assert redact_value("password", None) is None and redact_value("password", "") == ""


def test_a_credential_used_as_a_key_becomes_a_stand_in_and_its_value_goes():
    first, second = "ghp_" + "a" * 36, "ghp_" + "b" * 36
    out = redact_value("metadata", {first: "x", second: {"note": "y"}, "team": "platform"})
    assert out == {stand_in(first): REDACTED, stand_in(second): {"note": REDACTED}, "team": "platform"}


def test_named_identifiers_get_a_stand_in_instead_of_the_constant():
    secret = "glpat-" + "x8Yz1AbCdEfGhIjKlMnO"
    out = redact_value("metadata", {"session_id": secret, "note": secret}, identifiers={"session_id"})
    assert out == {"session_id": stand_in(secret), "note": REDACTED}
    assert redact_value("metadata", {"Session-ID": secret}, identifiers={"session_id"}) == {
        "Session-ID": stand_in(secret)
    }


def test_stand_ins_are_stable_distinct_opaque_and_valid_ids():
    a, b = "sk_live_" + "4eC39HqLyjWDarjtT1zdp7dc", "sk_live_" + "4eC39HqLyjWDarjtT1zdp7dd"
    assert stand_in(a) == stand_in(a) != stand_in(b)
    assert re.fullmatch(r"redacted-[0-9a-f]{16}", stand_in(a))
    assert "4eC39" not in stand_in(a)
    assert not looks_like_secret(stand_in(a))
    assert redact_identifier(a) == stand_in(a)
    assert redact_identifier("req_abc123") == "req_abc123"


def test_redaction_is_idempotent():
    value = {"pwd": "x", "tags": ["pwd:hunter2", "team:a"], "dsn": "postgres://u:p@h/d", "n": {"token": "t"}}
    once = redact_value("metadata", value)
    assert redact_value("metadata", once) == once
    assert once["tags"] == [REDACTED, "team:a"]


def test_long_values_are_checked_too():
    secret = "sk_live_" + "4eC39HqLyjWDarjtT1zdp7dc"
    assert looks_like_secret("x" * 5000 + " " + secret)
    assert not looks_like_secret("word " * 2000)


def test_attribution_applies_the_same_rules():
    a = normalize(
        headers={"X-AnyAPI-User-ID": REDACTED},
        metadata=[
            {"tags": ["team:platform", "pwd:hunter2"], "spend_logs_metadata": {"aws_key": "x", "db_pwd": 1}}
        ],
    )
    assert a.dimensions == {"team": "platform"}
    assert a.metadata == {"aws_key": REDACTED, "db_pwd": REDACTED}
    assert sorted(i.split("|")[0] for i in a.invalid) == ["secret_redacted", "secret_redacted"]
    assert not any("hunter2" in i for i in a.invalid)
