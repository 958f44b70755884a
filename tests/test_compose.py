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
AUTH_NAMES = (config.ENV_AUTH, config.ENV_MASTER_SECRET_FILE)
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
        config.ENV_KAFKA_SECURITY_PROTOCOL,
        config.ENV_KAFKA_SASL_USERNAME,
        config.ENV_KAFKA_SASL_PASSWORD_FILE,
        *AUTH_NAMES,
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
    assert bound[kafka["KAFKA_INTER_BROKER_LISTENER_NAME"]][0] == "localhost", "brokers talk on loopback only"


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
    """The same settings everywhere; only the worker adds authentication's two."""
    environments = [{k: v for k, v in services[name]["environment"].items() if k not in AUTH_NAMES}
                    for name in FLOORGUARD_SERVICES]  # fmt: skip
    assert all(environment == environments[0] for environment in environments)


def test_the_worker_and_the_cli_require_signed_commands_with_the_generated_master_secret(
    services: dict[str, Any],
) -> None:
    made = services["master-secret"]
    generated_path = re.search(r'path = "([^"]+)"', made["command"][0]).group(1)
    [made_volume] = made["volumes"]
    volume, directory = made_volume.split(":")[:2]
    assert generated_path.startswith(directory + "/")
    for name in ("worker", "cli"):
        service = services[name]
        environment = service["environment"]
        assert environment[config.ENV_AUTH] == "required"
        assert environment[config.ENV_MASTER_SECRET_FILE] == generated_path
        assert f"{volume}:{directory}:ro" in service["volumes"], f"{name} does not mount the master secret read-only"
        assert service["depends_on"]["master-secret"]["condition"] == "service_completed_successfully"
        assert config.ENV_MASTER_SECRET not in environment, "the master secret is never written in the compose file"


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


# --- Kafka's own guard (docs/kafka-acls.md) -------------------------------------------------------

SECRETS_DIRECTORY = "/run/secrets/"


def protocols(kafka: dict[str, str]) -> dict[str, str]:
    return dict(entry.split(":") for entry in kafka["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))


def broker_property(variable: str) -> str:
    """The apache/kafka image's reading of KAFKA_* variables: `___` is `-`, `__` is `_`, `_` is `.`."""
    name = variable.removeprefix("KAFKA_").lower()
    return name.replace("___", "\0").replace("__", "\1").replace("_", ".").replace("\0", "-").replace("\1", "_")


def test_broker_property_names_decode_as_the_image_does() -> None:
    assert broker_property("KAFKA_LISTENER_NAME_SASL_SCRAM___SHA___512_SASL_JAAS_CONFIG") == (
        "listener.name.sasl.scram-sha-512.sasl.jaas.config"
    )
    assert broker_property("KAFKA_ABC__DEF") == "abc_def"


def test_every_listener_off_the_container_s_loopback_needs_scram(services: dict[str, Any]) -> None:
    from worker.stack.kafka import AUTHORIZER_CLASS, SCRAM_LOGIN_MODULE

    kafka = services["kafka"]["environment"]
    bound = listeners(kafka["KAFKA_LISTENERS"])
    properties = {broker_property(name): value for name, value in kafka.items() if name.startswith("KAFKA_")}
    for name, protocol in protocols(kafka).items():
        if bound[name][0] != "localhost":
            assert protocol == "SASL_PLAINTEXT", f"{name} is reachable from the network without SASL"
            jaas = properties[f"listener.name.{name.lower()}.{config.SASL_MECHANISM.lower()}.sasl.jaas.config"]
            assert jaas == f"{SCRAM_LOGIN_MODULE} required;"
    assert properties["sasl.enabled.mechanisms"] == config.SASL_MECHANISM
    assert properties["authorizer.class.name"] == AUTHORIZER_CLASS
    assert properties["allow.everyone.if.no.acl.found"] == "false"
    assert set(properties["super.users"].split(";")) == {"User:ANONYMOUS", f"User:{config.KAFKA_ADMIN_USER}"}
    assert kafka["KAFKA_CONTROLLER_QUORUM_VOTERS"].endswith("@localhost:9093")
    worker = services["worker"]["environment"]
    assert worker[config.ENV_KAFKA_SECURITY_PROTOCOL] == protocols(kafka)["SASL"]
    assert host_port(worker[config.ENV_KAFKA_BOOTSTRAP]) == ("kafka", bound["SASL"][1])


def test_kafka_users_run_as_the_super_user_on_the_broker_s_loopback(services: dict[str, Any]) -> None:
    users = services["kafka-users"]
    kafka = services["kafka"]["environment"]
    assert users["network_mode"] == "service:kafka"
    bootstrap = host_port(users["environment"][config.ENV_KAFKA_BOOTSTRAP])
    plaintext = [name for name, protocol in protocols(kafka).items() if protocol == "PLAINTEXT" and name != "CONTROLLER"]
    assert [listeners(kafka["KAFKA_LISTENERS"])[name] for name in plaintext] == [bootstrap]
    assert bootstrap[0] == "localhost"
    assert config.ENV_KAFKA_SASL_USERNAME not in users["environment"], "the loopback listener names nobody"
    assert users["depends_on"]["kafka"]["condition"] == "service_healthy"
    for name in ("topics", "worker"):
        assert services[name]["depends_on"]["kafka-users"]["condition"] == "service_completed_successfully"


def created_users(services: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """{user: (role, password file)} from the kafka-users service's `floorguard kafka-user add` lines."""
    (script,) = services["kafka-users"]["command"]
    created = {}
    for step in script.split("&&"):
        match = re.fullmatch(r"\s*floorguard kafka-user add (\S+) --role (\S+) --password-file (\S+)\s*", step)
        assert match, f"not a kafka-user add: {step!r}"
        created[match[1]] = (match[2], match[3])
    return created


def test_each_service_s_kafka_user_is_created_with_its_role_and_its_password(
    compose: dict[str, Any], services: dict[str, Any]
) -> None:
    from worker.adapter.access import Role

    created = created_users(services)
    assert set(created) >= {"worker", config.KAFKA_ADMIN_USER}
    assert {role for role, _ in created.values()} <= {role.value for role in Role}
    expected_roles = {"migrate": "worker", "topics": "worker", "worker": "worker", "cli": "admin"}
    for name, role in expected_roles.items():
        environment = services[name]["environment"]
        username = environment[config.ENV_KAFKA_SASL_USERNAME]
        assert created[username][0] == role, f"{name} connects as {username}, who is not a {role}"
        assert environment[config.ENV_KAFKA_SASL_PASSWORD_FILE] == created[username][1], "the same password"
        assert config.ENV_KAFKA_SASL_PASSWORD not in environment, "passwords come from files, not the compose file"
    for name, service in services.items():
        files = [value for key, value in service.get("environment", {}).items() if key.endswith("_FILE")]
        if name == "kafka-users":
            files = [password_file for _, password_file in created.values()]
        for path in files:
            if path.startswith("/var/lib/floorguard-secrets/"):
                continue  # the generated master secret, checked above
            assert path.startswith(SECRETS_DIRECTORY)
            secret = path.removeprefix(SECRETS_DIRECTORY)
            assert secret in service["secrets"], f"{name} reads {path} but does not mount it"
            assert (COMPOSE_FILE.parent / compose["secrets"][secret]["file"]).is_file()


def test_the_cli_service_is_run_by_hand_only(services: dict[str, Any]) -> None:
    assert services["cli"]["profiles"] == ["cli"]
