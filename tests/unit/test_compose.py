"""docker-compose.yml: the production shape, wired by the same settings as the code reads."""

from pathlib import Path

import yaml

from spendledger.platform.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def load():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_services_and_commands():
    services = load()["services"]
    assert set(services) == {"kafka", "clickhouse", "migrate", "ingest", "processors", "sink"}
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert (
        services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"
    )  # KRaft, no ZooKeeper
    assert services["clickhouse"]["image"].startswith("clickhouse/clickhouse-server:")
    assert {name: services[name]["command"] for name in ("migrate", "ingest", "processors", "sink")} == {
        "migrate": ["migrate"],
        "ingest": ["api"],
        "processors": ["worker"],
        "sink": ["sink"],
    }


def test_every_setting_named_is_a_real_setting():
    known = {f"SPENDLEDGER_{name.upper()}" for name in Settings.model_fields}
    for name in ("migrate", "ingest", "processors", "sink"):
        env = load()["services"][name]["environment"]
        assert {"SPENDLEDGER_KAFKA_BOOTSTRAP", "SPENDLEDGER_CLICKHOUSE_DSN"} <= set(env)
        unknown = {k for k in env if k.startswith("SPENDLEDGER_")} - known
        assert not unknown, f"{name}: {unknown}"
        assert env["SPENDLEDGER_KAFKA_BOOTSTRAP"] == "kafka:9092"
        assert (
            env["SPENDLEDGER_CLICKHOUSE_DSN"].startswith("http://")
            and "@clickhouse:8123" in env["SPENDLEDGER_CLICKHOUSE_DSN"]
        )


def test_dockerfile_installs_the_cli():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["spendledger"]' in dockerfile and "pip install" in dockerfile


def test_each_server_listens_beyond_its_container_on_the_host_its_own_settings_read():
    """Its /metrics and /healthz must be reachable from the other containers (Prometheus, probes)."""
    from spendledger.platform.settings import ApiSettings, SinkSettings, WorkerSettings

    services = load()["services"]
    for name, settings, host in (
        ("ingest", ApiSettings, "api_host"),
        ("processors", WorkerSettings, "worker_web_host"),
        ("sink", SinkSettings, "api_host"),
    ):
        assert host in settings.model_fields, (name, host)
        listen = services[name]["environment"][f"SPENDLEDGER_{host.upper()}"]
        assert listen == "0.0.0.0", name  # noqa: S104 - inside its container, on the compose network
