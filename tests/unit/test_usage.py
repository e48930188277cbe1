import pytest

from ledger.errors import UsageError
from ledger.usage import TokenUsage, parse_usage


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        ({"input_tokens": 1000, "output_tokens": 200}, TokenUsage(1000, 200, 0, 0)),
        (
            {"input_tokens": 1000, "output_tokens": 200, "cache_read_tokens": 300, "cache_write_tokens": 100},
            TokenUsage(1000, 200, 300, 100),
        ),
        # OpenAI chat: prompt_tokens already includes cached tokens.
        (
            {"prompt_tokens": 1000, "completion_tokens": 50, "prompt_tokens_details": {"cached_tokens": 800}},
            TokenUsage(1000, 50, 800, 0),
        ),
        # OpenAI Responses API.
        (
            {"input_tokens": 500, "output_tokens": 10, "input_tokens_details": {"cached_tokens": 100}},
            TokenUsage(500, 10, 100, 0),
        ),
        # Anthropic: input_tokens EXCLUDES cache reads and writes: 100 + 1000 + 200.
        (
            {
                "input_tokens": 100,
                "cache_read_input_tokens": 1000,
                "cache_creation_input_tokens": 200,
                "output_tokens": 50,
            },
            TokenUsage(1300, 50, 1000, 200),
        ),
        # Gemini: thinking tokens bill as output.
        (
            {
                "promptTokenCount": 400,
                "candidatesTokenCount": 30,
                "thoughtsTokenCount": 70,
                "cachedContentTokenCount": 100,
            },
            TokenUsage(400, 100, 100, 0),
        ),
        (None, TokenUsage()),
    ],
)
def test_usage_shapes(usage, expected):
    assert parse_usage(usage) == expected


@pytest.mark.parametrize(
    "usage",
    [
        {"input_tokens": -1},
        {"input_tokens": "many"},
        {"input_tokens": 1.5},
        {"input_tokens": 10, "cache_read_tokens": 11},
        {"prompt_tokens": 1, "prompt_tokens_details": "x"},
    ],
)
def test_bad_usage(usage):
    with pytest.raises(UsageError):
        parse_usage(usage)
