"""processors/rebalance.py against faust-streaming's real classes: a new faust-streaming, aiokafka or
mode-streaming fails here, and each failure names what to review.

- The installed versions are the ones pyproject pins.
- Each method the patch replaces, copies or relies on has the source it was written against.
- The copied fetch loop differs from faust's only on lines marked `# fix:` or `# speed:`.
- Every attribute rebalance.py reads on faust's objects exists on a real app's.
- The patches, run on a real app's consumer, mark seeks, drop what was fetched before a seek, and
  keep a skipped message uncommitted. The consumer's thread, where faust calls aiokafka, is
  replaced by `Thread` below: no broker is contacted.
"""

import ast
import difflib
import hashlib
import importlib
import importlib.metadata
import itertools
import textwrap
import tomllib
from pathlib import Path
from typing import Any

import faust
import pytest
from aiokafka.structs import ConsumerRecord
from faust.transport import consumer as faust_consumer
from faust.types import TP as TopicPartition

from processors import rebalance

TP = TopicPartition("spend.raw", 1)
REBALANCE = Path(rebalance.__file__)
PYPROJECT = Path(__file__).parents[2] / "pyproject.toml"
REVIEW = "review processors/rebalance.py against it"

PINS = {"faust-streaming": "0.15.3", "aiokafka": "0.14.0", "mode-streaming": "0.7.1"}

# The source each part of the patch was written against, file by file: per method ("" for the whole
# file), the first 16 hex digits of the sha256 of its text, and what rebalance.py does with it.
SOURCES = {
    "faust/transport/consumer.py": [
        ("Consumer._drain_messages", "8308d11bc7a290dc", "copies it"),
        ("Consumer.ack", "6341c682b9ca914d", "wraps it: a skip holds"),
        ("Consumer._new_offset", "7524555f309a6493", "wraps it: commits stop at a hold"),
        ("ThreadDelegateConsumer.seek_to_committed", "7bc5dc7eb96c9b34", "wraps it: marks the seek"),
        ("ThreadDelegateConsumer.seek_wait", "36f330ed369996c3", "wraps it: marks the seek"),
        ("ThreadDelegateConsumer.highwaters", "edd7a5985e57f50f", "wraps it: ends by fetching"),
        ("Consumer.perform_seek", "b2fa31dd2a8784d3", "no await after seek_to_committed"),
        ("Consumer.seek", "52c40ac02ed69ecf", "seeks again with it"),
        ("Consumer.getmany", "fb4700d31489b3b4", "the copied loop iterates it"),
    ],
    "faust/transport/drivers/aiokafka.py": [
        ("AIOKafkaConsumerThread._seek_wait", "d1806d189d8f9ada", "what seek_wait does"),
    ],
    "faust/streams.py": [("Stream._c_aiter", "f5885937567a027a", "a skip acknowledges")],
    "faust/_cython/streams.pyx": [("", "0041622f4a251188", "skips, and sets `tracked`")],
    "faust/tables/recovery.py": [
        ("Recovery._resume_streams", "fec849656dbcea2c", "seeks, then resumes the flow"),
        ("Recovery.on_recovery_completed", "2720e26cb703b2fa", "seeks, then resumes the flow"),
        ("Recovery._build_highwaters", "881584f42842eb7e", "reads the ends with highwaters"),
    ],
    "mode/utils/queues.py": [
        ("FlowControlEvent.resume", "90d74eddd2aa7ed9", "hold_cleared wraps it"),
        ("FlowControlQueue.clear", "2c4fe5742d335a5d", "what a resume drops"),
    ],
    "mode/services.py": [("Service.wait_first", "79f98bfdf43f8ea8", "what the speed change skips")],
    "aiokafka/consumer/consumer.py": [("AIOKafkaConsumer.seek", "bc9152024b36916c", "what a seek does")],
}


def installed(path: str) -> Path:
    package = importlib.import_module(path.split("/")[0])
    return Path(str(package.__file__)).parents[1] / path


def source_of(path: str, name: str) -> str:
    """The text of `name` ("Class.method") in the installed file `path`; the whole file if no name."""
    text = installed(path).read_text(encoding="utf-8")
    if not name:
        return text
    node: Any = ast.parse(text)
    for part in name.split("."):
        node = next(child for child in node.body if getattr(child, "name", None) == part)
    return str(ast.get_source_segment(text, node))


@pytest.mark.parametrize(("package", "version"), PINS.items())
def test_the_installed_version_is_the_one_pinned(package: str, version: str) -> None:
    found = importlib.metadata.version(package)
    assert found == version, f"{package} {found} is installed, not {version}: {REVIEW}, then move the pin"
    project = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]
    server = project["optional-dependencies"]["server"]
    assert f"{package}=={version}" in server, f"pyproject.toml must pin {package}=={version}"


def test_install_checks_the_pinned_faust_version() -> None:
    assert rebalance.PATCHED_VERSION == PINS["faust-streaming"]


@pytest.mark.parametrize(
    ("path", "name", "digest", "use"),
    [pytest.param(path, *row, id=f"{path}:{row[0]}") for path, rows in SOURCES.items() for row in rows],
)
def test_the_installed_source_is_the_one_the_patch_was_written_against(
    path: str, name: str, digest: str, use: str
) -> None:
    found = hashlib.sha256(source_of(path, name).encode()).hexdigest()[:16]
    assert found == digest, f"{path} {name} changed ({use}): {REVIEW}, then record {found!r} here"


def body(text: str, name: str) -> list[str]:
    """The statements of function `name` ("Class.method") in `text`, dedented, without a docstring."""
    node: Any = ast.parse(text)
    for part in name.split("."):
        node = next(child for child in node.body if getattr(child, "name", None) == part)
    statements = node.body
    if isinstance(statements[0], ast.Expr) and isinstance(statements[0].value, ast.Constant):
        statements = statements[1:]
    lines = text.splitlines()[statements[0].lineno - 1 : node.end_lineno]
    return textwrap.dedent("\n".join(lines)).splitlines()


def indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def test_the_copied_fetch_loop_differs_from_fausts_only_on_marked_lines() -> None:
    faust_text = installed("faust/transport/consumer.py").read_text(encoding="utf-8")
    theirs = body(faust_text, "Consumer._drain_messages")
    ours = body(REBALANCE.read_text(encoding="utf-8"), "_drain_messages")
    diff = "\n".join(difflib.unified_diff(theirs, ours, "faust", "rebalance.py", lineterm="", n=0))
    removed: list[str] = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, theirs, ours, autojunk=False).get_opcodes():
        if tag == "equal":
            continue
        removed += [line.strip() for line in theirs[i1:i2]]
        block = -1  # the indent of the marked line the added lines below belong to
        for line in ours[j1:j2]:
            if "# fix" in line or "# speed" in line:
                block = indent(line)
            else:
                assert block >= 0 and indent(line) > block, f"an unmarked change:\n{line}\n\n{diff}"
    # faust's delivery (replaced by `deliver`) and its read offset update (now under a check)
    assert removed == [
        "await self.wait_first(",
        "callback(message), self.suspend_flow.wait()",
        ")",
        "set_read_offset(tp, offset)",
    ], diff


# Who is who in rebalance.py: a name whose attributes it reads, and the real object it stands for.
FAUST_NAMES = {
    "self": "consumer",
    "consumer": "consumer",
    "fetcher": "app._fetcher",
    "flow": "app.flow_control",
    "queue": "queue",
    "message": "message",
    "app": "app",
    "tp": "tp",
    "faust": "faust",
    "faust_consumer": "faust_consumer",
    "Consumer": "faust_consumer.Consumer",
    "ThreadDelegateConsumer": "faust_consumer.ThreadDelegateConsumer",
}
OWN_NAMES = {"asyncio", "logging", "log", "metrics", "owner", "partitions", "listed"}
OWN_NAMES |= {"seeks", "fetched_at", "stale", "holds"}


def attribute_paths(text: str) -> set[tuple[str, str]]:
    """Each `name.attr.attr` read or set in `text` (`cast(T, name).attr` counts as `name.attr`)."""
    paths = set()
    for node in ast.walk(ast.parse(text)):
        if not isinstance(node, ast.Attribute):
            continue
        attrs: list[str] = []
        root: ast.expr = node
        while isinstance(root, ast.Attribute):
            attrs.insert(0, root.attr)
            root = root.value
        if isinstance(root, ast.Call) and getattr(root.func, "id", None) == "cast":
            root = root.args[1]
        if isinstance(root, ast.Name):
            paths.add((root.id, ".".join(attrs)))
    return paths


_apps = itertools.count()


@pytest.fixture
async def app() -> faust.App:
    rebalance.install()
    app = faust.App(f"test-faust-surface-{next(_apps)}", broker="kafka://127.0.0.1:9", store="memory://")
    app.topics._acking_topics.add(TP.topic)  # what subscribing an agent to the topic does
    return app


def record(offset: int) -> ConsumerRecord:
    return ConsumerRecord(TP.topic, TP.partition, offset, 0, 0, b"k", b"v", None, 1, 1, [])


async def test_every_attribute_rebalance_reads_on_faust_objects_exists_on_a_real_app(app: faust.App) -> None:
    consumer = app.consumer
    objects = {
        "app": app,
        "consumer": consumer,
        "queue": app.topic(TP.topic).queue,
        "message": consumer._to_message(TP, record(7)),
        "tp": TP,
        "faust": faust,
        "faust_consumer": faust_consumer,
    }
    paths = attribute_paths(REBALANCE.read_text(encoding="utf-8"))
    unknown = {name for name, _ in paths} - FAUST_NAMES.keys() - OWN_NAMES
    assert not unknown, f"say in FAUST_NAMES or OWN_NAMES whose objects these are: {unknown}"
    missing = []
    for name, attrs in sorted(paths):
        if name not in FAUST_NAMES or attrs.startswith("_spendledger"):
            continue
        first, *rest = FAUST_NAMES[name].split(".")
        target: Any = objects[first]
        for attr in [*rest, *attrs.split(".")]:
            if not hasattr(target, attr):
                missing.append(f"{name}.{attrs} ({FAUST_NAMES[name]})")
                break
            target = getattr(target, attr)
    assert not missing, f"faust's objects lack what rebalance.py reads: {missing}; {REVIEW}"
    # What the copied loop and the holds take for granted about those attributes:
    assert consumer._read_offset[TopicPartition("never.read", 0)] is None
    assert consumer._committed_offset[TopicPartition("never.read", 0)] is None
    assert objects["message"].tracked is False  # a fetched message is untracked until a stream takes it
    assert app.topic(TP.topic).queue in set(app.flow_control._queues)  # cleared on resume


class Thread:
    """The consumer's thread, where faust calls aiokafka: it hands out one batch and records seeks."""

    def __init__(self, app: faust.App, batch: list[int], committed: int = 0) -> None:
        self.app, self.batch, self.committed = app, batch, committed
        self.seeks: list[tuple[Any, int]] = []

    async def getmany(self, active_partitions: Any, timeout: float) -> dict[Any, list[ConsumerRecord]]:
        batch, self.batch = self.batch, []
        self.app._fetcher._stopped.set()  # the fetch loop stops after this batch
        return {TP: [record(offset) for offset in batch]}

    async def seek_to_committed(self) -> dict[Any, int]:
        return {TP: self.committed}

    async def seek_wait(self, partitions: dict[Any, int]) -> None:
        self.seeks += partitions.items()

    def seek(self, tp: Any, offset: int) -> None:
        self.seeks.append((tp, offset))

    def assignment(self) -> set[Any]:
        return {TP}

    def highwater(self, tp: Any) -> int:
        return 1_000

    async def highwaters(self, *tps: Any) -> dict[Any, int]:
        return {tp: 10 for tp in tps}


def real_consumer(app: faust.App, thread: Thread, callback: Any) -> Any:
    consumer = app.consumer
    consumer._thread = thread
    consumer.callback = callback
    consumer.resume_partitions({TP})
    return consumer


@pytest.mark.parametrize("flow_active", [True, False])
async def test_a_real_consumer_drops_what_was_fetched_before_a_seek_and_seeks_again(
    app: faust.App, flow_active: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    delivered: list[int] = []

    async def callback(message: Any) -> None:
        delivered.append(message.offset)
        if message.offset == 401:
            await consumer.perform_seek()  # recovery's seek, landing mid-batch

    thread = Thread(app, [400, 401, 402, 403], committed=380)
    consumer = real_consumer(app, thread, callback)
    raced: list[int] = []
    wait_first = consumer.wait_first

    async def counted(*coros: Any) -> Any:
        raced.append(1)
        return await wait_first(*coros)

    monkeypatch.setattr(consumer, "wait_first", counted)
    if flow_active:
        app.flow_control.resume()
    await consumer._drain_messages(app._fetcher)
    assert delivered == [400, 401]  # 402 and 403 were fetched before the seek
    assert thread.seeks == [(TP, 380)] and consumer._read_offset[TP] == 380
    assert rebalance._seeks(consumer) == {TP: 2}  # recovery's seek and the one after it
    assert not consumer._gap[TP]  # no jump from 380 to 402 counted as acknowledged
    assert len(raced) == (0 if flow_active else 2)  # the speed change: no race while the flow is active


async def test_a_real_consumer_marks_the_seeks_recovery_makes(app: faust.App) -> None:
    consumer = real_consumer(app, Thread(app, [], committed=380), callback=None)
    await consumer.perform_seek()
    assert consumer._read_offset[TP] == 380 and rebalance._seeks(consumer) == {TP: 1}
    await consumer.seek_wait({TP: 5})
    assert rebalance._seeks(consumer) == {TP: 2}


async def test_a_real_consumer_keeps_a_skipped_message_uncommitted_and_reads_it_again(app: faust.App) -> None:
    async def callback(message: Any) -> None:
        if message.offset > 8:
            message.tracked = True  # taken in by a stream; 8 is skipped (mid-rebalance)
        message.ack(consumer)  # a skip acknowledges too

    thread = Thread(app, [8, 9, 10, 11, 12])
    consumer = real_consumer(app, thread, callback)
    consumer._committed_offset[TP] = 8
    await consumer._drain_messages(app._fetcher)
    assert thread.seeks == [(TP, 8)] and consumer._read_offset[TP] == 8  # read again from the skipped one
    # faust alone commits 13 here: it passes one missing offset after the committed one.
    assert consumer._filter_committable_offsets({TP}) == {}
    again = consumer._to_message(TP, record(8))
    again.tracked = True
    again.ack(consumer)
    assert rebalance._holds(consumer) == {}
    # 9-12, taken off the acknowledged list above the hold, are acknowledged again when read again.
    assert consumer._filter_committable_offsets({TP}) == {TP: 9}


async def test_a_real_consumer_reads_end_offsets_by_fetching(
    app: faust.App, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fetched(config: Any, listed: dict[tuple[str, int], int]) -> dict[tuple[str, int], int]:
        return {key: end + 2 for key, end in listed.items()}  # Tansu lists a batch's first offset + 1

    consumer = real_consumer(app, Thread(app, []), callback=None)
    monkeypatch.setattr(rebalance, "_fetch_config", {"bootstrap.servers": "127.0.0.1:9"})
    monkeypatch.setattr(rebalance, "fetched_end_offsets", fetched)
    assert await consumer.highwaters(TP) == {TP: 12}  # listed: 10


def test_faust_swallows_a_recovery_callbacks_error_so_ours_end_the_worker(monkeypatch: Any) -> None:
    """faust-streaming runs a table's `on_recover` callbacks with `asyncio.wait` and never reads their
    errors: a failed rebuild would go on unseen. `fatal_on_error` (on both of the worker's) exits."""
    import asyncio
    from unittest import mock

    import faust

    from processors import app as worker_app

    exits: list[int] = []
    monkeypatch.setattr(worker_app.os, "_exit", exits.append)

    async def main() -> list[str]:
        app = faust.App("surface-recover", broker="kafka://127.0.0.1:9", store="memory://")
        # One callback a table, as in the worker: faust runs a table's callbacks one after the other,
        # and the first to raise would stop the rest.
        table = app.Table("state", partitions=1, key_type=bytes, value_type=bytes)
        other = app.Table("other-state", partitions=1, key_type=bytes, value_type=bytes)
        calls: list[str] = []

        @table.on_recover
        async def bare() -> None:
            calls.append("bare")
            raise ValueError("unreadable")

        @other.on_recover
        @worker_app.fatal_on_error
        async def wrapped() -> None:
            calls.append("wrapped")
            raise ValueError("unreadable")

        app._consumer = mock.MagicMock()  # not contacted before the callbacks
        app.consumer_generation_id = 1  # returns right after the callbacks (generation 0 != 1)
        await app.tables.recovery.on_recovery_completed(0)  # raises nothing: faust dropped both errors
        return calls

    assert sorted(asyncio.run(main())) == ["bare", "wrapped"]
    assert exits == [70]  # only the wrapped callback ended the worker
