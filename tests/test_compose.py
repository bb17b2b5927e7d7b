"""docker-compose.yml cannot run here (no Docker engine): check it against the code."""

from pathlib import Path

import yaml

from safeswap.cli import app
from streams.settings import Settings, env_names

COMPOSE = yaml.safe_load((Path(__file__).resolve().parents[1] / "docker-compose.yml").read_text())


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


def test_host_clients_get_a_listener_that_advertises_what_is_published():
    env = COMPOSE["services"]["kafka"]["environment"]
    advertised = dict(item.split("://", 1) for item in env["KAFKA_ADVERTISED_LISTENERS"].split(","))
    listeners = dict(item.split("://", 1) for item in env["KAFKA_LISTENERS"].split(","))
    protocols = dict(item.split(":", 1) for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    published = {}
    for mapping in COMPOSE["services"]["kafka"]["ports"]:
        host_ip, host_port, container_port = mapping.split(":")
        published[int(container_port)] = (host_ip, int(host_port))
    # Every port published to the host belongs to a listener that advertises a host address
    # on that same host port (a host client reconnects to the advertised address).
    assert published
    host_listeners = []
    for container_port, (host_ip, host_port) in published.items():
        assert host_ip == "127.0.0.1"  # never on every interface
        name = next(n for n, address in listeners.items() if address.rsplit(":", 1)[1] == str(container_port))
        host, port = advertised[name].rsplit(":", 1)
        assert host in ("localhost", "127.0.0.1") and int(port) == host_port, (name, advertised[name])
        assert name in protocols and name != env["KAFKA_INTER_BROKER_LISTENER_NAME"]
        host_listeners.append(name)
    # ... and the containers keep theirs: kafka:9092, which the safeswap services use.
    assert advertised[env["KAFKA_INTER_BROKER_LISTENER_NAME"]] == "kafka:9092"
    assert set(protocols) == set(listeners) and len(host_listeners) == 1
