"""Every pricing rule with exact Decimal results; the hand calculation is in each comment."""

from datetime import UTC, datetime
from decimal import Decimal

import pytest

from ledger.errors import PriceFileError
from ledger.pricing import PriceBook, parse_price_overrides, split_model_ref
from ledger.usage import TokenUsage

AT = datetime(2026, 11, 1, tzinfo=UTC)
BOOK = PriceBook()


def price(model, usage, provider=None, at=AT, reported=None, book=BOOK):
    return book.price(model=model, provider=provider, usage=usage, at=at, reported_cost_usd=reported)


def test_catalog_gpt4o():
    # $2.50/MTok in, $10/MTok out: 1000 * 2.5e-6 + 200 * 10e-6 = 0.0025 + 0.002
    p = price("openai/gpt-4o", TokenUsage(1000, 200))
    assert (p.cost_usd, p.input_cost_usd, p.output_cost_usd) == (
        Decimal("0.0045"),
        Decimal("0.0025"),
        Decimal("0.002"),
    )
    assert (p.price_source, p.provider, p.model) == ("catalog", "openai", "gpt-4o")


def test_bare_model_with_provider_field():
    assert price("gpt-4o", TokenUsage(1000, 200), provider="openai").cost_usd == Decimal("0.0045")


def test_cache_read_price_openai():
    # 600 uncached * 2.5 + 400 cached * 1.25 = 2000 /1e6 = 0.002; + 200 * 10 /1e6 = 0.002
    assert price("openai/gpt-4o", TokenUsage(1000, 200, cache_read_tokens=400)).cost_usd == Decimal("0.004")


def test_cache_read_and_write_anthropic():
    # claude-3-5-sonnet: $3 in, $0.30 cache read, $3.75 cache write, $15 out.
    # 100*3 + 1000*0.3 + 200*3.75 = 1350 /1e6 = 0.00135; 50*15 /1e6 = 0.00075 -> 0.0021
    p = price("anthropic/claude-3-5-sonnet-20241022", TokenUsage(1300, 50, 1000, 200))
    assert p.cost_usd == Decimal("0.0021")


@pytest.mark.parametrize(
    ("input_tokens", "expected"),
    [
        # gemini-2.5-pro: <= 200k input: $1.25 in, $10 out; above: $2.50 in, $15 out, for the WHOLE request.
        (200_000, Decimal("0.252")),  # 200000*1.25e-6 + 200*10e-6
        (200_001, Decimal("0.5030025")),  # 200001*2.5e-6 + 200*15e-6
        (300_000, Decimal("0.753")),  # 300000*2.5e-6 + 200*15e-6
    ],
)
def test_long_context_tier_boundary(input_tokens, expected):
    assert price("gemini-2.5-pro", TokenUsage(input_tokens, 200), provider="google").cost_usd == expected


def test_unknown_model_is_unpriced_not_zero():
    p = price("acme/secret-model-9", TokenUsage(1000, 200))
    assert p.cost_usd is None and p.price_source == "unpriced"


def test_reported_cost_used_only_without_a_price():
    assert price("made-up-model", TokenUsage(10, 10), reported=Decimal("0.5")).price_source == "reported"
    assert price("made-up-model", TokenUsage(10, 10), reported=Decimal("0.5")).cost_usd == Decimal("0.5")
    catalog = price("openai/gpt-4o", TokenUsage(1000, 200), reported=Decimal("9"))
    assert (catalog.price_source, catalog.cost_usd) == ("catalog", Decimal("0.0045"))


def test_unknown_provider_is_never_guessed():
    # A self-hosted llama must not be priced as some cloud's llama.
    assert price("llama-3.1-70b", TokenUsage(1000, 10), provider="self-hosted").price_source == "unpriced"


OVERRIDES = """
[[price]]
provider = "self-hosted"
model = "llama-3-70b"
effective_from = "2026-01-01T00:00:00Z"
input_usd_per_mtok = "0.20"
output_usd_per_mtok = "0.60"

[[price]]
model = "openai/gpt-4o"
effective_from = "2026-06-01T00:00:00Z"
input_usd_per_mtok = "2.00"
output_usd_per_mtok = "8.00"
cache_read_usd_per_mtok = "0.50"
"""


def test_override_file_wins_over_catalog_from_its_effective_date():
    book = PriceBook(parse_price_overrides(OVERRIDES))
    # negotiated: 1000*2e-6 + 200*8e-6 = 0.002 + 0.0016
    after = price("openai/gpt-4o", TokenUsage(1000, 200), at=datetime(2026, 6, 1, tzinfo=UTC), book=book)
    assert (after.cost_usd, after.price_source) == (Decimal("0.0036"), "override")
    # cached at its own rate: 600*2 + 400*0.5 = 1400 /1e6; + 0.0016 = 0.003
    cached = price(
        "openai/gpt-4o", TokenUsage(1000, 200, 400), at=datetime(2026, 7, 1, tzinfo=UTC), book=book
    )
    assert cached.cost_usd == Decimal("0.003")
    # the price is chosen by the EVENT's time: the day before, the catalog applies.
    before = price(
        "openai/gpt-4o", TokenUsage(1000, 200), at=datetime(2026, 5, 31, 23, 59, tzinfo=UTC), book=book
    )
    assert (before.cost_usd, before.price_source) == (Decimal("0.0045"), "catalog")


def test_self_hosted_override():
    book = PriceBook(parse_price_overrides(OVERRIDES))
    # 1M * 0.20/MTok + 1M * 0.60/MTok
    p = price("llama-3-70b", TokenUsage(1_000_000, 1_000_000), provider="self-hosted", book=book)
    assert (p.cost_usd, p.price_source, p.provider) == (Decimal("0.8"), "override", "self-hosted")


def test_price_file_errors_reported_together():
    bad = '[[price]]\nmodel = "x"\n[[price]]\nmodel = "y"\neffective_from = "2026-01-01T00:00:00Z"\ninput_usd_per_mtok = "-1"\noutput_usd_per_mtok = "1"\n'
    with pytest.raises(PriceFileError) as info:
        parse_price_overrides(bad)
    assert "price #1: effective_from is required" in str(info.value)
    assert "price #2: input_usd_per_mtok must be a non-negative number" in str(info.value)


def test_rounding_to_twelve_places():
    # 1 token * $0.075/MTok (gemini-1.5-flash class prices) must keep sub-nano precision.
    book = PriceBook(
        parse_price_overrides(
            '[[price]]\nmodel="tiny"\nprovider="p"\neffective_from=2026-01-01T00:00:00Z\ninput_usd_per_mtok="0.0375"\noutput_usd_per_mtok="0"\n'
        )
    )
    assert price("tiny", TokenUsage(1, 0), provider="p", book=book).cost_usd == Decimal("0.0000000375")


@pytest.mark.parametrize(
    ("model", "provider", "expected"),
    [
        ("openai/gpt-4o", None, ("openai", "gpt-4o")),
        ("gpt-4o", "OpenAI", ("openai", "gpt-4o")),
        ("gemini/gemini-2.5-pro", None, ("google", "gemini-2.5-pro")),
        ("meta-llama/Llama-3-70b", None, (None, "meta-llama/Llama-3-70b")),
        ("openai/gpt-4o", "openrouter", ("openrouter", "openai/gpt-4o")),
    ],
)
def test_split_model_ref(model, provider, expected):
    assert split_model_ref(model, provider) == expected


def test_banded_linear_form_equals_the_catalog_for_every_catalog_model():
    """The fast path is only the catalog's own arithmetic: exact on every model, tiered or not, at
    random usage and at each tier's edges."""
    import random

    from genai_prices import data_snapshot

    from ledger.pricing import BandedPrice, catalog_cost

    rng = random.Random(7)
    checked = tiered = refused = 0
    for provider in data_snapshot.get_snapshot().providers:
        for model in provider.models:
            model_price = model.get_prices(AT)
            banded = BandedPrice.of(model_price)
            if banded is None:
                refused += 1
                continue
            inputs = [rng.randrange(0, 2_000_000) for _ in range(4)]
            for start in banded.starts:
                inputs += [start - 1, start, start + 1]
            tiered += bool(banded.starts)
            for total in inputs:
                read = rng.randrange(0, total + 1)
                counts = (total, rng.randrange(0, 100_000), read, rng.randrange(0, total - read + 1))
                assert banded.cost(counts) == catalog_cost(model_price, counts), (
                    provider.id,
                    model.id,
                    counts,
                )
                checked += 1
    assert checked > 4000 and tiered > 10  # the catalog has both kinds
    assert refused < 10


def test_tiered_prices_are_priced_by_band():
    from ledger.pricing import BandedPrice, LinearPrice

    found = PriceBook()._catalog_model("google", "gemini-2.5-pro")
    assert found is not None
    model_price = found[1].get_prices(AT)
    assert LinearPrice.of(model_price) is None  # long-context tiers: not one linear form
    banded = BandedPrice.of(model_price)
    assert banded is not None and banded.starts == (200_000,)
    assert banded.cost((200_000, 200, 0, 0))[0] == Decimal("0.252")
    assert banded.cost((200_001, 200, 0, 0))[0] == Decimal("0.5030025")
