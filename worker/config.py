"""Settings, read once from the environment. Every knob has its unit last in its name."""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_KAFKA_BOOTSTRAP = "FLOORGUARD_KAFKA_BOOTSTRAP"
ENV_DATABASE_URL = "FLOORGUARD_DATABASE_URL"
ENV_TOPIC_PREFIX = "FLOORGUARD_TOPIC_PREFIX"
ENV_GROUP_ID = "FLOORGUARD_GROUP_ID"
ENV_PARTITIONS = "FLOORGUARD_PARTITIONS"
ENV_SWEEP_INTERVAL_MS = "FLOORGUARD_SWEEP_INTERVAL_MS"
ENV_METRICS_PORT = "FLOORGUARD_METRICS_PORT"
ENV_BATCH_RECORDS_MAX = "FLOORGUARD_BATCH_RECORDS_MAX"
ENV_BATCH_WAIT_MS = "FLOORGUARD_BATCH_WAIT_MS"
ENV_LOOK_UP_ALL_RECORDS = "FLOORGUARD_LOOK_UP_ALL_RECORDS"
ENV_COMPILED = "FLOORGUARD_COMPILED"
ENV_AUTH = "FLOORGUARD_AUTH"  # off | required
ENV_MASTER_SECRET = "FLOORGUARD_MASTER_SECRET"
ENV_MASTER_SECRET_FILE = "FLOORGUARD_MASTER_SECRET_FILE"
ENV_KEY = "FLOORGUARD_KEY"  # <key_id>:<secret>, what the CLI signs its commands with
AUTH_MODES = ("off", "required")
MASTER_SECRET_LENGTH_MIN_CHARS = 32
ENV_KAFKA_SECURITY_PROTOCOL = "FLOORGUARD_KAFKA_SECURITY_PROTOCOL"
ENV_KAFKA_SASL_USERNAME = "FLOORGUARD_KAFKA_SASL_USERNAME"
ENV_KAFKA_SASL_PASSWORD = "FLOORGUARD_KAFKA_SASL_PASSWORD"
ENV_KAFKA_SASL_PASSWORD_FILE = "FLOORGUARD_KAFKA_SASL_PASSWORD_FILE"
ENV_KAFKA_SSL_CAFILE = "FLOORGUARD_KAFKA_SSL_CAFILE"

TOPIC_PREFIX_DEFAULT = "floorguard"
GROUP_ID_DEFAULT = "floorguard-worker"
PARTITIONS_DEFAULT = 8
SWEEP_INTERVAL_DEFAULT_MS = 250  # how often a worker looks for expired holds; 0 turns its sweeper off
METRICS_PORT_DEFAULT = 9464  # /metrics and /health on loopback; 0 turns them off
# A fetch takes what has arrived, up to this many records over all partitions: under load batches
# grow towards it (one transaction and one flush each), when idle a lone command goes alone.
# Measured on 2 cores: 500 held the hot wallet near 3,300/s, 5,000 near 5,000/s (docs/BENCHMARKS.md).
BATCH_RECORDS_MAX_DEFAULT = 5_000
# How long a fetch waits for a first record when none is there: it bounds the idle poll, never
# holds back a record that has arrived.
BATCH_WAIT_DEFAULT_MS = 5
# After a partition's claim, every id of its next this many records is looked up for an earlier
# decision, and ten times as many after a commit refused for an id presumed new; past them, only
# the ids it decided lately (docs/design.md, "Idempotency without a lookup"). Clients send again
# when a rebalance or an outage delays their reply, so ids the last owner decided come back soon
# after a claim: in a chaos run (300 commands/s) without this window each such id cost a batch's
# second decision, 387 in 400 s.
LOOK_UP_ALL_RECORDS_DEFAULT = 1_000
REFUSED_LOOK_UP_FACTOR = 10

# The embedded local default (`floorguard stack up`): loopback only, ports chosen to stay clear
# of a Kafka or PostgreSQL the user may already run on the standard ports, and below Linux's
# ephemeral range (32768–60999): a client polling a port in that range while nothing listens can
# connect to itself and hold the port, so that the broker then fails to bind it.
LOCAL_KAFKA_PORT = 29092
LOCAL_KAFKA_CONTROLLER_PORT = 29093
LOCAL_KAFKA_SASL_PORT = 29094  # SASL_PLAINTEXT with SCRAM-SHA-512: where Kafka's ACLs apply (docs/kafka-acls.md)
LOCAL_POSTGRES_PORT = 25432
LOCAL_KAFKA_BOOTSTRAP = f"127.0.0.1:{LOCAL_KAFKA_PORT}"
LOCAL_KAFKA_SASL_BOOTSTRAP = f"127.0.0.1:{LOCAL_KAFKA_SASL_PORT}"
LOCAL_DATABASE_URL = f"postgresql://floorguard@127.0.0.1:{LOCAL_POSTGRES_PORT}/floorguard"

# Kafka's own guard (docs/kafka-acls.md): SCRAM users, and ACLs on what each may touch.
SASL_MECHANISM = "SCRAM-SHA-512"
SECURITY_PROTOCOLS_WITH_SASL = ("SASL_PLAINTEXT", "SASL_SSL")
SECURITY_PROTOCOL_DEFAULT = "PLAINTEXT"  # without a username
SECURITY_PROTOCOL_WITH_SASL_DEFAULT = "SASL_PLAINTEXT"  # with one
# The one SCRAM user the brokers (the local stack's and compose's) name in `super.users`.
KAFKA_ADMIN_USER = "admin"
PASSWORD_FILE_SIZE_MAX = 4096


class Misconfigured(Exception):
    """A setting the worker cannot run with: it stops (exit 2) and names the setting."""


@dataclass(frozen=True, slots=True)
class Topics:
    """The four topic names of the contract, under one prefix."""

    prefix: str

    @property
    def commands(self) -> str:
        return f"{self.prefix}.commands"

    @property
    def replies(self) -> str:
        return f"{self.prefix}.replies"

    @property
    def events(self) -> str:
        return f"{self.prefix}.events"

    @property
    def dlq(self) -> str:
        return f"{self.prefix}.dlq"

    def all(self) -> tuple[str, str, str, str]:
        return (self.commands, self.replies, self.events, self.dlq)


class SettingsError(ValueError):
    """The environment names an impossible combination of settings."""


@dataclass(frozen=True, slots=True)
class KafkaCredentials:
    """Who a client is to Kafka: a SCRAM-SHA-512 user over SASL_PLAINTEXT or SASL_SSL."""

    username: str
    password: str = field(repr=False)  # never printed, never logged
    security_protocol: str = SECURITY_PROTOCOL_WITH_SASL_DEFAULT
    ssl_cafile: str | None = None  # SASL_SSL only: the CA that signed the brokers' certificates

    def __post_init__(self) -> None:
        if self.security_protocol not in SECURITY_PROTOCOLS_WITH_SASL:
            raise SettingsError(f"a SASL username needs a security protocol of {' or '.join(SECURITY_PROTOCOLS_WITH_SASL)},"
                                f" not {self.security_protocol}")  # fmt: skip
        if not self.username or not self.password:
            raise SettingsError("a Kafka SASL user needs both a username and a password")

    @classmethod
    def from_env(cls) -> KafkaCredentials | None:
        """None when no username is set: then the client connects over PLAINTEXT, as before."""
        username = os.environ.get(ENV_KAFKA_SASL_USERNAME, "")
        protocol = os.environ.get(ENV_KAFKA_SECURITY_PROTOCOL, "")
        if not username:
            if protocol not in ("", SECURITY_PROTOCOL_DEFAULT):
                raise SettingsError(f"{ENV_KAFKA_SECURITY_PROTOCOL}={protocol} needs {ENV_KAFKA_SASL_USERNAME}")
            return None
        return cls(
            username=username,
            password=_password_from_env(),
            security_protocol=protocol or SECURITY_PROTOCOL_WITH_SASL_DEFAULT,
            ssl_cafile=os.environ.get(ENV_KAFKA_SSL_CAFILE) or None,
        )

    def ssl_context(self) -> ssl.SSLContext | None:
        if self.security_protocol != "SASL_SSL":
            return None
        return ssl.create_default_context(cafile=self.ssl_cafile)

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments of every aiokafka client (producer, consumer, admin) for this user."""
        return {
            "security_protocol": self.security_protocol,
            "sasl_mechanism": SASL_MECHANISM,
            "sasl_plain_username": self.username,
            "sasl_plain_password": self.password,
            "ssl_context": self.ssl_context(),
        }


def kafka_client_options(credentials: KafkaCredentials | None) -> dict[str, Any]:
    """aiokafka keyword arguments: none for PLAINTEXT, the SASL ones for a user."""
    return credentials.client_options() if credentials is not None else {}


def _password_from_env() -> str:
    password = os.environ.get(ENV_KAFKA_SASL_PASSWORD)
    path = os.environ.get(ENV_KAFKA_SASL_PASSWORD_FILE)
    if password and path:
        raise SettingsError(f"set {ENV_KAFKA_SASL_PASSWORD} or {ENV_KAFKA_SASL_PASSWORD_FILE}, not both")
    if path:
        return read_password_file(path)
    if not password:
        raise SettingsError(f"{ENV_KAFKA_SASL_USERNAME} needs {ENV_KAFKA_SASL_PASSWORD} or {ENV_KAFKA_SASL_PASSWORD_FILE}")
    return password


def read_password_file(path: str) -> str:
    """A password file's first line, without its line end (the form of Docker and Kubernetes secrets)."""
    text = Path(path).read_text(encoding="utf-8")[:PASSWORD_FILE_SIZE_MAX]
    lines = text.splitlines()
    if not lines or not lines[0]:
        raise SettingsError(f"the password file {path} is empty")
    return lines[0]


@dataclass(frozen=True, slots=True)
class Settings:
    kafka_bootstrap: str
    database_url: str
    topics: Topics
    group_id: str
    partitions: int
    sweep_interval_ms: int = SWEEP_INTERVAL_DEFAULT_MS
    metrics_port: int = METRICS_PORT_DEFAULT
    batch_records_max: int = BATCH_RECORDS_MAX_DEFAULT
    batch_wait_ms: int = BATCH_WAIT_DEFAULT_MS
    look_up_all_records: int = LOOK_UP_ALL_RECORDS_DEFAULT
    compiled: bool = True  # the compiled hot path (native/) when installed; "0" forces the Python core
    auth_required: bool = False
    master_secret: bytes | None = field(default=None, repr=False)  # never printed, never logged
    kafka_credentials: KafkaCredentials | None = None  # None: PLAINTEXT, as the local stack's default listener

    @property
    def kafka_options(self) -> dict[str, Any]:
        """aiokafka keyword arguments for this worker's user (empty without one)."""
        return kafka_client_options(self.kafka_credentials)

    @classmethod
    def from_env(cls, kafka_bootstrap: str | None = None, database_url: str | None = None) -> Settings:
        return cls(
            kafka_bootstrap=kafka_bootstrap or os.environ[ENV_KAFKA_BOOTSTRAP],
            database_url=database_url or os.environ[ENV_DATABASE_URL],
            topics=Topics(os.environ.get(ENV_TOPIC_PREFIX, TOPIC_PREFIX_DEFAULT)),
            group_id=os.environ.get(ENV_GROUP_ID, GROUP_ID_DEFAULT),
            partitions=int(os.environ.get(ENV_PARTITIONS, PARTITIONS_DEFAULT)),
            sweep_interval_ms=int(os.environ.get(ENV_SWEEP_INTERVAL_MS, SWEEP_INTERVAL_DEFAULT_MS)),
            metrics_port=int(os.environ.get(ENV_METRICS_PORT, METRICS_PORT_DEFAULT)),
            batch_records_max=int(os.environ.get(ENV_BATCH_RECORDS_MAX, BATCH_RECORDS_MAX_DEFAULT)),
            batch_wait_ms=int(os.environ.get(ENV_BATCH_WAIT_MS, BATCH_WAIT_DEFAULT_MS)),
            look_up_all_records=int(os.environ.get(ENV_LOOK_UP_ALL_RECORDS, LOOK_UP_ALL_RECORDS_DEFAULT)),
            compiled=os.environ.get(ENV_COMPILED, "1") != "0",
            auth_required=_auth_required(),
            master_secret=master_secret_from_env(),
            kafka_credentials=KafkaCredentials.from_env(),
        )


def _auth_required() -> bool:
    mode = os.environ.get(ENV_AUTH, "off")
    if mode not in AUTH_MODES:
        raise Misconfigured(f"{ENV_AUTH} must be one of {', '.join(AUTH_MODES)}, not {mode!r}")
    return mode == "required"


def master_secret_from_env() -> bytes | None:
    """The operators' master secret, from $FLOORGUARD_MASTER_SECRET_FILE (preferred: it stays out
    of process listings) or $FLOORGUARD_MASTER_SECRET; None when neither is set."""
    path = os.environ.get(ENV_MASTER_SECRET_FILE)
    if path and os.environ.get(ENV_MASTER_SECRET):
        raise Misconfigured(f"{ENV_MASTER_SECRET_FILE} and {ENV_MASTER_SECRET} are both set: set one")
    if path:
        try:
            text = Path(path).read_text().strip()
        except OSError as error:
            raise Misconfigured(f"{ENV_MASTER_SECRET_FILE}: cannot read {path} ({error.strerror})") from None
        source = ENV_MASTER_SECRET_FILE
    else:
        text = os.environ.get(ENV_MASTER_SECRET, "").strip()
        source = ENV_MASTER_SECRET
        if not text:
            return None
    if len(text) < MASTER_SECRET_LENGTH_MIN_CHARS:
        raise Misconfigured(f"{source}: the master secret must be at least {MASTER_SECRET_LENGTH_MIN_CHARS} characters")
    return text.encode()


def endpoints_in_env() -> bool:
    """True when the user named both services: then no command starts anything."""
    return bool(os.environ.get(ENV_KAFKA_BOOTSTRAP)) and bool(os.environ.get(ENV_DATABASE_URL))
