"""track_context / @track: nesting merges, and attribution never leaks across threads or asyncio tasks."""

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from spendledger.sdk import current_attribution, propagate, track, track_context


def fields() -> dict[str, str]:
    return dict(current_attribution().fields)


def test_nesting_merges_inner_wins_tags_accumulate_and_exit_restores():
    assert not current_attribution()
    with track_context(team="support", env="prod", tags=["feature:search"]):
        with track_context(user_id="u1", env="staging", tags=["region:eu"]) as inner:
            assert fields() == {"team": "support", "env": "staging", "user_id": "u1"}
            assert inner.tags == ("feature:search", "region:eu")
            assert inner.event_fields() == {
                "metadata": {
                    "team": "support",
                    "env": "staging",
                    "user_id": "u1",
                    "tags": ["feature:search", "region:eu"],
                }
            }
        assert fields() == {"team": "support", "env": "prod"}
    assert not current_attribution()


def test_values_are_strings_none_is_skipped_and_bad_values_are_refused():
    with track_context(user_id=42, project=None, cost_center=1.5):
        assert fields() == {"user_id": "42", "cost_center": "1.5"}
    with pytest.raises(TypeError, match="string or a number"):
        with track_context(user_id={"id": 1}):
            pass
    with pytest.raises(TypeError, match="key:value"):
        with track_context(tags="team:a"):
            pass


def test_an_exception_inside_still_restores_the_outer_attribution():
    with track_context(team="a"):
        with pytest.raises(RuntimeError):
            with track_context(team="b"):
                raise RuntimeError("boom")
        assert fields() == {"team": "a"}


def test_track_decorates_sync_and_async_functions_and_runtime_context_inside_wins():
    @track(feature="summarize", user_id="system_bot")
    def summarize(user: str | None = None) -> dict[str, str]:
        if user is None:
            return fields()
        with track_context(user_id=user):
            return fields()

    @track(feature="chat")
    async def chat() -> dict[str, str]:
        await asyncio.sleep(0)
        return fields()

    assert summarize() == {"feature": "summarize", "user_id": "system_bot"}
    assert summarize("u9") == {"feature": "summarize", "user_id": "u9"}
    assert summarize.__name__ == "summarize"
    with track_context(team="support"):
        assert asyncio.run(chat()) == {"team": "support", "feature": "chat"}
    assert not current_attribution()


def test_track_refuses_callables_and_generators():
    def get_current_user_id() -> str:
        return "u1"

    with pytest.raises(TypeError, match="static values only"):
        track(user_id=get_current_user_id)  # type: ignore[arg-type]

    def gen():
        yield 1

    with pytest.raises(TypeError, match="generators"):
        track(feature="x")(gen)


def test_threads_do_not_see_each_others_attribution():
    seen: dict[str, dict[str, str]] = {}
    barrier = threading.Barrier(8)

    def work(n: int) -> None:
        with track_context(user_id=f"u{n}"):
            barrier.wait()  # every thread is inside its own context at once
            seen[f"u{n}"] = fields()

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    with track_context(team="outer"):
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    # A new thread starts without the parent's attribution.
    assert seen == {f"u{n}": {"user_id": f"u{n}"} for n in range(8)}


def test_propagate_carries_the_attribution_into_a_pool():
    with ThreadPoolExecutor(2) as pool:
        with track_context(team="support"):
            carried = pool.submit(propagate(fields)).result()
            bare = pool.submit(fields).result()
    assert carried == {"team": "support"}
    assert bare == {}


async def test_asyncio_tasks_keep_their_own_attribution_across_awaits():
    async def handle(n: int) -> dict[str, str]:
        with track_context(user_id=f"u{n}"):
            for _ in range(5):
                await asyncio.sleep(0)  # interleave with the other tasks
            return fields()

    with track_context(team="support"):
        results = await asyncio.gather(*(handle(n) for n in range(20)))
    assert results == [{"team": "support", "user_id": f"u{n}"} for n in range(20)]
    assert not current_attribution()
