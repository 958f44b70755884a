"""No Docker engine runs here: check what can be checked of compose/ without one."""

from __future__ import annotations

from urllib.parse import urlsplit

import yaml

from tests.conftest import ROOT
from worker import config

COMPOSE = yaml.safe_load((ROOT / "compose" / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


def test_images_are_pinned_and_healthchecked():
    for name in ("kafka", "postgres"):
        image = SERVICES[name]["image"]
        assert ":" in image and not image.endswith(":latest"), image
        assert "healthcheck" in SERVICES[name]


def test_the_ledger_services_use_the_code_s_variables_and_topic_prefix():
    for name in ("migrate", "topics", "worker"):
        environment = SERVICES[name]["environment"]
        assert {config.ENV_KAFKA_BOOTSTRAP, config.ENV_DATABASE_URL} <= environment.keys()
        assert environment[config.ENV_TOPIC_PREFIX] == config.TOPIC_PREFIX_DEFAULT
        assert set(environment) <= {config.ENV_KAFKA_BOOTSTRAP, config.ENV_DATABASE_URL, config.ENV_TOPIC_PREFIX,
                                    config.ENV_GROUP_ID, config.ENV_PARTITIONS, config.ENV_KAFKA_SECURITY_PROTOCOL,
                                    config.ENV_KAFKA_SASL_USERNAME, config.ENV_KAFKA_SASL_PASSWORD_FILE,
                                    config.ENV_AUTH, config.ENV_MASTER_SECRET_FILE}  # fmt: skip


def test_endpoints_match_the_kafka_listeners_and_the_postgres_service():
    environment = SERVICES["worker"]["environment"]
    assert environment[config.ENV_KAFKA_BOOTSTRAP] in SERVICES["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    url = urlsplit(environment[config.ENV_DATABASE_URL])
    postgres = SERVICES["postgres"]["environment"]
    assert (url.hostname, url.port) == ("postgres", 5432)
    assert (url.username, url.password, url.path.lstrip("/")) == (
        postgres["POSTGRES_USER"], postgres["POSTGRES_PASSWORD"], postgres["POSTGRES_DB"]
    )


def test_the_worker_waits_for_migrations_and_topics():
    depends = SERVICES["worker"]["depends_on"]
    assert depends["migrate"]["condition"] == depends["topics"]["condition"] == "service_completed_successfully"
    assert SERVICES["migrate"]["command"] == ["migrate"] and SERVICES["topics"]["command"] == ["topics"]
    assert all(name in SERVICES for name in depends)
