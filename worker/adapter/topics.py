"""Creates the contract's topics and checks the commands topic before a worker trusts it."""

from __future__ import annotations

import asyncio
import time

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import TopicAlreadyExistsError, for_code

from worker.config import KafkaCredentials, Misconfigured, Topics, kafka_client_options

ADMIN_TIMEOUT_MS = 30_000
LISTED_TIMEOUT_S = 30.0  # how long a creation may take to reach the broker's metadata
LISTED_POLL_S = 0.05
REPLIES_RETENTION_MS = 24 * 60 * 60 * 1000
DLQ_RETENTION_MS = 30 * 24 * 60 * 60 * 1000

# The commands topic is the ledger's history: kept forever, stamped with the broker's time.
COMMANDS_CONFIG = {"retention.ms": "-1", "message.timestamp.type": "LogAppendTime", "cleanup.policy": "delete"}


class TopicMisconfigured(Misconfigured):
    pass


def topic_configs(topics: Topics) -> dict[str, dict[str, str]]:
    return {
        topics.commands: COMMANDS_CONFIG,
        topics.replies: {"retention.ms": str(REPLIES_RETENTION_MS)},
        topics.events: {"retention.ms": "-1"},  # the audit stream is kept as long as the log
        topics.dlq: {"retention.ms": str(DLQ_RETENTION_MS)},
    }


async def create_topics(bootstrap: str, topics: Topics, partitions: int,
                        credentials: KafkaCredentials | None = None) -> list[str]:
    """Create what is missing; return the names created. An existing topic is left as it is."""
    admin = _admin(bootstrap, credentials)
    await admin.start()
    created = []
    try:
        existing = set(await admin.list_topics())
        for name, config in topic_configs(topics).items():
            if name in existing:
                continue
            try:
                response = await admin.create_topics([NewTopic(name, partitions, 1, topic_configs=config)])
            except TopicAlreadyExistsError:
                continue
            # The admin client returns a topic's error rather than raising it (a refused ACL, say).
            (_name, error_code, *_message) = response.topic_errors[0]
            if error_code == TopicAlreadyExistsError.errno:
                continue
            if error_code:
                raise for_code(error_code)(f"creating {name}")
            created.append(name)
        if created:
            await _listed(admin, created)
    finally:
        await admin.close()
    return created


async def _listed(admin: AIOKafkaAdminClient, names: list[str]) -> None:
    """Wait until the broker's metadata lists each topic with its partitions: the controller answers
    a creation before the brokers list the topic, and a client that sends at once (a test, a load
    run, an agent) would otherwise be told the topic does not exist."""
    deadline_s = time.monotonic() + LISTED_TIMEOUT_S
    while True:
        described = await admin.describe_topics(names)
        if len(described) == len(names) and all(t["error_code"] == 0 and t["partitions"] for t in described):
            return
        if time.monotonic() > deadline_s:
            raise TimeoutError(f"the broker did not list {names} within {LISTED_TIMEOUT_S} s of their creation")
        await asyncio.sleep(LISTED_POLL_S)


async def delete_topics(bootstrap: str, topics: Topics, credentials: KafkaCredentials | None = None) -> None:
    """Delete the four topics of a prefix, those that exist (a load run's or a test's, at its end)."""
    admin = _admin(bootstrap, credentials)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        doomed = [name for name in topics.all() if name in existing]
        if doomed:
            await admin.delete_topics(doomed)
    finally:
        await admin.close()


async def check_commands_topic(bootstrap: str, topics: Topics, credentials: KafkaCredentials | None = None) -> int:
    """Refuse a commands topic that is not LogAppendTime with infinite retention.

    Returns its partition count. Time and replay both rest on these two settings.
    """
    admin = _admin(bootstrap, credentials)
    await admin.start()
    try:
        described = await admin.describe_topics([topics.commands])
        if not described or described[0]["error_code"] != 0:
            raise TopicMisconfigured(f"{topics.commands} does not exist: run `floorguard topics`")
        partitions = len(described[0]["partitions"])
        resource = ConfigResource(ConfigResourceType.TOPIC, topics.commands)
        (response,) = await admin.describe_configs([resource])
    finally:
        await admin.close()
    (resource_result,) = response.resources
    configs = {entry[0]: entry[1] for entry in resource_result[4]}
    for name in ("retention.ms", "message.timestamp.type"):
        if configs.get(name) != COMMANDS_CONFIG[name]:
            raise TopicMisconfigured(
                f"{topics.commands} has {name}={configs.get(name)}; the ledger needs {COMMANDS_CONFIG[name]}"
            )
    return partitions


def _admin(bootstrap: str, credentials: KafkaCredentials | None) -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=ADMIN_TIMEOUT_MS,
                               **kafka_client_options(credentials))  # fmt: skip
