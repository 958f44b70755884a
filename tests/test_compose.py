"""compose/docker-compose.yml agrees with the worker's settings and with itself.

No Docker engine runs in CI, so this is what can be checked without one: the names and values the
worker reads, the Kafka listeners behind the bootstrap address, the database URL against the
postgres service, pinned images and the order of start.
"""

from __future__ import annotations

import pathlib
import re
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from worker import config

ROOT = pathlib.Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "compose" / "docker-compose.yml"
DOCKERFILE = ROOT / "compose" / "Dockerfile"
FLOORGUARD_SERVICES = ("migrate", "topics", "worker")
PULLED_IMAGE = re.compile(r"^[a-z0-9./_-]+:(?P<tag>[0-9][A-Za-z0-9._-]*)$")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(document, dict)
    return document


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


def listeners(value: str) -> dict[str, tuple[str, int]]:
    """`NAME://host:port,...` as {NAME: (host, port)}; an empty host stays empty."""
    parsed = {}
    for entry in value.split(","):
        name, address = entry.split("://", 1)
        host, port = address.rsplit(":", 1)
        parsed[name] = (host, int(port))
    return parsed


def host_port(address: str) -> tuple[str, int]:
    host, port = address.rsplit(":", 1)
    return host, int(port)


def published_ports(service: dict[str, Any]) -> dict[int, int]:
    """{host port: container port} from short-syntax `[ip:]host:container` entries."""
    published = {}
    for entry in service.get("ports", []):
        *_, host, container = str(entry).split(":")
        published[int(host)] = int(container)
    return published


@pytest.mark.parametrize("name", FLOORGUARD_SERVICES)
def test_floorguard_services_use_the_worker_settings_names(services: dict[str, Any], name: str) -> None:
    environment = services[name]["environment"]
    known = {
        config.ENV_KAFKA_BOOTSTRAP,
        config.ENV_DATABASE_URL,
        config.ENV_TOPIC_PREFIX,
        config.ENV_GROUP_ID,
        config.ENV_PARTITIONS,
    }
    assert {config.ENV_KAFKA_BOOTSTRAP, config.ENV_DATABASE_URL, config.ENV_TOPIC_PREFIX} <= set(environment)
    floorguard_names = {key for key in environment if key.startswith("FLOORGUARD_")}
    assert floorguard_names <= known, "a FLOORGUARD_ variable the worker does not read"
    assert environment[config.ENV_TOPIC_PREFIX] == config.TOPIC_PREFIX_DEFAULT
    if config.ENV_PARTITIONS in environment:
        assert int(environment[config.ENV_PARTITIONS]) == config.PARTITIONS_DEFAULT


def test_the_kafka_bootstrap_is_an_advertised_listener(services: dict[str, Any]) -> None:
    kafka = services["kafka"]["environment"]
    bootstrap = host_port(services["worker"]["environment"][config.ENV_KAFKA_BOOTSTRAP])
    advertised = listeners(kafka["KAFKA_ADVERTISED_LISTENERS"])
    bound = listeners(kafka["KAFKA_LISTENERS"])
    name = next(name for name, address in advertised.items() if address == bootstrap)
    assert bootstrap[0] == "kafka" and "kafka" in services
    assert bound[name][1] == bootstrap[1], "the advertised listener's port is the one it listens on"
    assert name == kafka["KAFKA_INTER_BROKER_LISTENER_NAME"]


def test_kafka_is_published_to_the_host_through_the_external_listener(services: dict[str, Any]) -> None:
    kafka = services["kafka"]
    advertised = listeners(kafka["environment"]["KAFKA_ADVERTISED_LISTENERS"])
    bound = listeners(kafka["environment"]["KAFKA_LISTENERS"])
    assert advertised["EXTERNAL"] == ("localhost", 9092)
    assert published_ports(kafka)[9092] == bound["EXTERNAL"][1]
    protocol_map = kafka["environment"]["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"]
    protocols = dict(entry.split(":") for entry in protocol_map.split(","))
    assert set(bound) == set(protocols)


def test_kafka_is_a_single_kraft_node(services: dict[str, Any]) -> None:
    kafka = services["kafka"]["environment"]
    node_id = kafka["KAFKA_NODE_ID"]
    assert set(kafka["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    controller = kafka["KAFKA_CONTROLLER_LISTENER_NAMES"]
    voter_id, voter_address = kafka["KAFKA_CONTROLLER_QUORUM_VOTERS"].split("@")
    assert voter_id == node_id
    assert listeners(kafka["KAFKA_LISTENERS"])[controller][1] == host_port(voter_address)[1]
    for name in (
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
        "KAFKA_SHARE_COORDINATOR_STATE_TOPIC_REPLICATION_FACTOR",
    ):
        assert kafka[name] == "1", name
    assert kafka["KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS"] == "0"
    assert kafka["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"


def test_the_database_url_matches_the_postgres_service(services: dict[str, Any]) -> None:
    url = urlsplit(services["worker"]["environment"][config.ENV_DATABASE_URL])
    postgres = services["postgres"]
    environment = postgres["environment"]
    assert url.scheme == "postgresql"
    assert url.hostname == "postgres"
    assert url.port == 5432
    assert url.username == environment["POSTGRES_USER"]
    assert url.password == environment["POSTGRES_PASSWORD"]
    assert url.path == "/" + environment["POSTGRES_DB"]
    assert published_ports(postgres)[5432] == 5432
    assert "pg_isready" in postgres["healthcheck"]["test"]


def test_all_floorguard_services_share_one_environment(services: dict[str, Any]) -> None:
    environments = [services[name]["environment"] for name in FLOORGUARD_SERVICES]
    assert all(environment == environments[0] for environment in environments)


def test_images_are_pinned(services: dict[str, Any]) -> None:
    for name, service in services.items():
        if "build" in service:
            continue  # built from this repository, never pulled
        match = PULLED_IMAGE.match(service["image"])
        assert match, f"{name}: {service['image']} is not pinned to a version tag"
        assert match["tag"] != "latest"
    assert services["kafka"]["image"] == "apache/kafka:4.1.1"
    assert re.fullmatch(r"postgres:15\.[0-9]+", services["postgres"]["image"])


def test_the_worker_starts_after_its_dependencies(services: dict[str, Any]) -> None:
    depends_on = services["worker"]["depends_on"]
    for name in depends_on:
        assert name in services, f"worker depends on a service that does not exist: {name}"
    assert depends_on["migrate"]["condition"] == "service_completed_successfully"
    assert depends_on["topics"]["condition"] == "service_completed_successfully"
    assert depends_on["kafka"]["condition"] == "service_healthy"
    assert depends_on["postgres"]["condition"] == "service_healthy"
    assert "healthcheck" in services["kafka"] and "healthcheck" in services["postgres"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["topics"]["depends_on"]["kafka"]["condition"] == "service_healthy"


@pytest.mark.parametrize(("name", "command"), [("migrate", "migrate"), ("topics", "topics"), ("worker", "worker")])
def test_floorguard_services_run_the_cli(services: dict[str, Any], name: str, command: str) -> None:
    service = services[name]
    assert service["command"] == [command]
    assert service["build"] == {"context": "..", "dockerfile": "compose/Dockerfile"}


def test_the_dockerfile_installs_the_client_and_the_worker() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert re.search(r"^FROM python:3\.11-slim$", text, re.MULTILINE)
    assert "pip install ./clients/python ." in text
    assert 'ENTRYPOINT ["floorguard"]' in text
