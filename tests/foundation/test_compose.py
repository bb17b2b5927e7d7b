"""docker-compose.yml cannot run here (no Docker engine): check it against the code."""

from pathlib import Path

import yaml

from safeswap.cli import app
from streams.settings import Settings, env_names

COMPOSE = yaml.safe_load((Path(__file__).resolve().parents[2] / "docker-compose.yml").read_text())


def test_services_kafka_kraft_init_and_two_workers():
    services = COMPOSE["services"]
    assert {"kafka", "init-topics", "worker-1", "worker-2"} <= set(services)
    image = services["kafka"]["image"]
    name, _, tag = image.partition(":")
    assert name == "apache/kafka" and tag and tag != "latest"  # pinned
    env = services["kafka"]["environment"]
    assert "controller" in env["KAFKA_PROCESS_ROLES"] and "broker" in env["KAFKA_PROCESS_ROLES"]  # KRaft
    assert services["init-topics"]["command"] == ["topics", "create"]
    for worker in ("worker-1", "worker-2"):
        assert services[worker]["command"] == ["worker"]
        assert services[worker]["depends_on"]["init-topics"]["condition"] == "service_completed_successfully"


def test_safeswap_services_set_only_variables_the_code_reads_with_valid_values():
    readable = env_names()
    for name, service in COMPOSE["services"].items():
        if name == "kafka":
            continue
        env = {k: str(v) for k, v in service["environment"].items()}
        assert set(env) <= readable, set(env) - readable
        settings = Settings.from_env(env)  # parses every value with the code's own types
        host, port = settings.broker.split(":")
        assert host == "kafka" and port == "9092"
        advertised = COMPOSE["services"]["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
        assert f"//{settings.broker}" in advertised


def test_the_commands_compose_runs_exist_in_the_cli():
    names = {command.name or command.callback.__name__ for command in app.registered_commands}
    groups = {group.name for group in app.registered_groups}
    assert "worker" in names and "topics" in groups
