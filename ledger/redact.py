"""Credential detection: secrets never reach Kafka, ClickHouse or logs.

Two signals: a key whose name says it holds a credential, or a value shaped like
one (provider API keys, bearer tokens, JWTs, cloud access keys, private keys).
"""

from __future__ import annotations

import re
from typing import Any

REDACTED = "[REDACTED]"

_SECRET_KEY = re.compile(
    r"(password|passwd|passphrase|secret|token$|api[_\-.]?key|private[_\-.]?key|access[_\-.]?key"
    r"|authorization|credential|cookie|bearer|^auth$|^pass$|signature$)",
    re.IGNORECASE,
)

_SECRET_VALUE = re.compile(
    r"(\bsk-[A-Za-z0-9_\-]{16,}"  # OpenAI / Anthropic (sk-ant-...) style keys
    r"|\bBearer\s+\S{8,}"
    r"|\bBasic\s+[A-Za-z0-9+/=]{12,}"
    r"|\beyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]*"  # JWT
    r"|\b(AKIA|ASIA)[0-9A-Z]{16}\b"  # AWS access key id
    r"|\bAIza[0-9A-Za-z_\-]{30,}"  # Google API key
    r"|\bgh[pousr]_[A-Za-z0-9]{30,}"  # GitHub tokens
    r"|\bxox[abpors]-[A-Za-z0-9\-]{10,}"  # Slack tokens
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----)"
)


def is_secret_key(key: str) -> bool:
    """A metadata or header name that says it carries a credential."""
    return _SECRET_KEY.search(key.strip().lower()) is not None


def looks_like_secret(value: str) -> bool:
    """A value shaped like a credential, whatever its key."""
    return _SECRET_VALUE.search(value) is not None


def redact_value(key: str, value: Any) -> Any:
    """Redact one value by its key and, for strings, its shape; recurse into containers."""
    if is_secret_key(key) and value not in (None, ""):
        return REDACTED
    if isinstance(value, str):
        return REDACTED if looks_like_secret(value) else value
    if isinstance(value, dict):
        return {str(k): redact_value(str(k), v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_value(key, v) for v in value]
    return value
