"""Kafka's own guard against the real broker: SCRAM users on the SASL listener, ACLs by role.

A worker connected as its own SCRAM user decides what an agent, connected as another, sends; the
agent reads its reply on its own reply topic, and the broker refuses it everything else. Every
refusal is checked against the error the broker gives (never a mere silence), and beside an
operation the same client is allowed, so that a missing ACL or a missing refusal both fail.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, TopicAuthorizationFailedError

from floorguard import Ledger
from tests.conftest import Services, Workers, wait_until_serving
from worker import config
from worker.adapter.access import KafkaUsers, Role, agent_reply_topic, new_password, role_acls
from worker.config import KafkaCredentials, Settings
from worker.store.store import Store

ENV_TEST_SASL_BOOTSTRAP = "FLOORGUARD_TEST_KAFKA_SASL_BOOTSTRAP"  # when the services are not the local stack
TOPIC_AUTHORIZATION_FAILED = 29
REFUSAL_TIMEOUT_S = 10
EXPIRY_TIMEOUT_S = 20
USERS_GONE_TIMEOUT_S = 10
HOLD_TTL_MS = 1_000


@dataclass(frozen=True)
class User:
    name: str
    password: str

    def credentials(self) -> KafkaCredentials:
        return KafkaCredentials(self.name, self.password)


@pytest.fixture
def sasl_bootstrap(services: Services) -> str:
    """The SASL listener beside the services' PLAINTEXT one."""
    address = os.environ.get(ENV_TEST_SASL_BOOTSTRAP)
    if address is None:
        assert services.kafka_bootstrap == config.LOCAL_KAFKA_BOOTSTRAP, (
            f"the services are not the local stack: name their SASL listener in {ENV_TEST_SASL_BOOTSTRAP}"
        )
        address = config.LOCAL_KAFKA_SASL_BOOTSTRAP
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
    except OSError:
        pytest.fail(f"no SASL listener on {address}: a broker started before it existed needs "
                    "`floorguard stack down` then `floorguard stack up`")  # fmt: skip
    return address


@pytest.fixture
async def users(services: Services, settings: Settings) -> AsyncIterator[tuple[User, User, str]]:
    """An agent with its own reply topic and a worker for this test's topics and group; removed after."""
    suffix = uuid.uuid4().hex[:8]
    agent, worker = User(f"test-agent-{suffix}", new_password()), User(f"test-worker-{suffix}", new_password())
    reply_topic = agent_reply_topic(settings.topics, agent.name)
    async with KafkaUsers(services.kafka_bootstrap) as kafka_users:  # loopback PLAINTEXT: the super user
        assert await kafka_users.create_reply_topic(reply_topic, 1)
        await kafka_users.add(agent.name, agent.password,
                              role_acls(Role.AGENT, settings.topics, settings.group_id, reply_topic))  # fmt: skip
        await kafka_users.add(worker.name, worker.password, role_acls(Role.WORKER, settings.topics, settings.group_id))
    yield agent, worker, reply_topic
    async with KafkaUsers(services.kafka_bootstrap) as kafka_users:
        assert await kafka_users.remove(agent.name) and await kafka_users.remove(worker.name)
        # The broker answers the listing from its metadata, which the controller's change reaches
        # a moment later (a fresh-clone CI run once listed a user just removed): wait for it.
        deadline = asyncio.get_running_loop().time() + USERS_GONE_TIMEOUT_S
        while not {agent.name, worker.name}.isdisjoint(user.name for user in await kafka_users.list()):
            assert asyncio.get_running_loop().time() < deadline, "a removed user is still listed"
            await asyncio.sleep(0.1)
    admin = AIOKafkaAdminClient(bootstrap_servers=services.kafka_bootstrap)
    await admin.start()
    try:
        await admin.delete_topics([reply_topic])
    finally:
        await admin.close()


def as_user(sasl_bootstrap: str, user: User) -> dict[str, Any]:
    return {"bootstrap_servers": sasl_bootstrap, **user.credentials().client_options()}


@pytest.mark.slow
async def test_agents_and_workers_get_what_their_role_needs_and_nothing_else(
    services: Services, settings: Settings, sasl_bootstrap: str, users: tuple[User, User, str],
    workers: Workers, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    agent, worker, reply_topic = users
    password_file = tmp_path / "worker.password"
    password_file.write_text(worker.password + "\n")
    workers.start(**{config.ENV_KAFKA_BOOTSTRAP: sasl_bootstrap, config.ENV_KAFKA_SASL_USERNAME: worker.name,
                     config.ENV_KAFKA_SASL_PASSWORD_FILE: str(password_file)})  # fmt: skip

    # The worker, over SASL, decides what the agent sends over SASL; the reply comes on the agent's topic.
    async with Ledger(sasl_bootstrap, topic_prefix=settings.topics.prefix, reply_topic=reply_topic, timeout_s=20,
                      sasl_username=agent.name, sasl_password=agent.password) as ledger:  # fmt: skip
        await wait_until_serving(ledger)
        await ledger.open("wallet-1")
        await ledger.credit("wallet-1", 100)
        assert (await ledger.charge("wallet-1", 40)).balance == 60
        # The worker's sweeper writes `expire` to the commands topic under the worker's own user.
        reserved = await ledger.reserve("wallet-1", 60, ttl_ms=HOLD_TTL_MS)
        assert reserved.reserved == 60
    await _wait_until_reserved_is(settings, "wallet-1", 0)

    # The agent writes commands (the Ledger did) and reads its reply topic; nothing else.
    producer = AIOKafkaProducer(**as_user(sasl_bootstrap, agent))
    await producer.start()
    try:
        await producer.send_and_wait(settings.topics.commands, b"{}", key=b"wallet-1")  # allowed: the control
        for topic in (settings.topics.events, settings.topics.replies, settings.topics.dlq, reply_topic):
            with pytest.raises(TopicAuthorizationFailedError):
                await asyncio.wait_for(producer.send_and_wait(topic, b"{}", key=b"wallet-1"), REFUSAL_TIMEOUT_S)
    finally:
        await producer.stop()

    read_first = functools.partial(_read_first, services.kafka_bootstrap, sasl_bootstrap)
    assert await read_first(agent, reply_topic)  # allowed: the control
    with pytest.raises(TopicAuthorizationFailedError):
        await read_first(agent, settings.topics.commands)
    assert await read_first(None, settings.topics.events), "there are events to be refused"
    admin = AIOKafkaAdminClient(**as_user(sasl_bootstrap, agent))
    await admin.start()
    try:
        # Topics the agent may not even see: the broker answers their metadata with the refusal.
        described = await admin.describe_topics([settings.topics.events, settings.topics.replies, settings.topics.dlq])
        assert [topic["error_code"] for topic in described] == [TOPIC_AUTHORIZATION_FAILED] * 3, described
        created = await admin.create_topics([NewTopic(f"{settings.topics.prefix}.forged", 1, 1)])
        assert [error[1] for error in created.topic_errors] == [TOPIC_AUTHORIZATION_FAILED]
        deleted = await admin.delete_topics([settings.topics.commands, reply_topic])
        assert [error[1] for error in deleted.topic_error_codes] == [TOPIC_AUTHORIZATION_FAILED] * 2
    finally:
        await admin.close()
    assert await read_first(None, settings.topics.commands), "the commands topic stays"

    # A wrong password is refused by the broker's SCRAM check (the right one connected above).
    caplog.set_level(logging.ERROR, logger="aiokafka")
    impostor = AIOKafkaProducer(**as_user(sasl_bootstrap, User(agent.name, agent.password + "x")))
    with pytest.raises(KafkaConnectionError):
        await impostor.start()
    await impostor.stop()
    assert "SaslAuthenticationFailed" in caplog.text

    assert all(process.poll() is None for process in workers.processes), "the worker ran throughout"


async def _read_first(plaintext_bootstrap: str, sasl_bootstrap: str, user: User | None, topic: str) -> list[Any]:
    """The first records of a topic's partitions, read as `user` (None: loopback PLAINTEXT, the super user)."""
    options = as_user(sasl_bootstrap, user) if user else {"bootstrap_servers": plaintext_bootstrap}
    consumer = AIOKafkaConsumer(enable_auto_commit=False, **options)
    await consumer.start()
    try:
        partitions = await asyncio.wait_for(_partitions(plaintext_bootstrap, topic), REFUSAL_TIMEOUT_S)
        assignment = [TopicPartition(topic, partition) for partition in partitions]
        consumer.assign(assignment)
        await consumer.seek_to_beginning(*assignment)
        fetched = await asyncio.wait_for(consumer.getmany(timeout_ms=2_000), REFUSAL_TIMEOUT_S)
        return [record for records in fetched.values() for record in records]
    finally:
        await consumer.stop()


async def _partitions(bootstrap: str, topic: str) -> list[int]:
    """Asked as the super user: the agent may describe its topics, but the question is what it may read."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        (described,) = await admin.describe_topics([topic])
        return sorted(partition["partition"] for partition in described["partitions"])
    finally:
        await admin.close()


async def _wait_until_reserved_is(settings: Settings, wallet: str, reserved: int) -> None:
    store = await Store.connect(settings.database_url, pool_size_max=1)
    try:
        deadline = asyncio.get_running_loop().time() + EXPIRY_TIMEOUT_S
        while (shown := await store.show_wallet(wallet)).reserved != reserved:
            assert asyncio.get_running_loop().time() < deadline, f"reserved stayed {shown.reserved}: no expire decided"
            await asyncio.sleep(0.2)
    finally:
        await store.close()
