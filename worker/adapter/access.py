"""Kafka's own guard: SCRAM users and the ACLs of their role, managed over Kafka's Admin API.

aiokafka's admin client has no call for ACLs nor for SCRAM credentials, but its protocol module
has the ACL requests, and AlterUserScramCredentials / DescribeUserScramCredentials (KIP-554) are
two small structs written here; they go through the admin client's own connection, so they
authenticate like every other request. aiokafka is pinned to 0.14.x (`pyproject.toml`), and
`_admin_send` asserts the private method it relies on.

A role's ACLs are a pure table (`role_acls`); adding a user makes the broker's ACLs of that
principal equal to the table: missing bindings are created, others of that principal deleted.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.new_topic import NewTopic
from aiokafka.errors import TopicAlreadyExistsError, for_code
from aiokafka.protocol.admin import (
    CreateAclsRequest_v1,
    DeleteAclsRequest_v1,
    DescribeAclsRequest_v1,
)
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.types import (
    CompactArray,
    CompactBytes,
    CompactString,
    Int8,
    Int16,
    Int32,
    Schema,
    TaggedFields,
)

from worker.adapter.topics import ADMIN_TIMEOUT_MS, REPLIES_RETENTION_MS
from worker.config import KAFKA_ADMIN_USER, KafkaCredentials, Topics, kafka_client_options

# SCRAM-SHA-512 as Kafka stores it: PBKDF2-HMAC-SHA512 over the password, with a random salt.
SCRAM_MECHANISM_SHA_512 = 2  # ScramMechanism's wire code (1 is SHA-256)
SCRAM_ITERATIONS = 4096  # Kafka's default and its minimum for SHA-512
SCRAM_SALT_BYTES = 32
PASSWORD_BYTES = 24  # a generated password: 192 bits, 32 URL-safe characters
# A user name is also part of its reply topic's name, so it keeps to a topic name's characters.
USER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
ANY_HOST = "*"
APPLY_TIMEOUT_S = 10.0  # a change reaches the broker's copy of the metadata within this
APPLY_POLL_S = 0.05


class ResourceType(enum.IntEnum):
    TOPIC = 2
    GROUP = 3
    CLUSTER = 4


class PatternType(enum.IntEnum):
    ANY = 1
    LITERAL = 3
    PREFIXED = 4


class Operation(enum.IntEnum):
    ANY = 1
    READ = 3
    WRITE = 4
    CREATE = 5
    DELETE = 6
    ALTER = 7
    DESCRIBE = 8
    DESCRIBE_CONFIGS = 10


class Permission(enum.IntEnum):
    ANY = 1
    ALLOW = 3


ACL_RESOURCE_ANY = 1  # the filter's "every resource type"


class Role(enum.StrEnum):
    AGENT = "agent"  # writes commands, reads its reply topic
    WORKER = "worker"  # decides: reads commands in its group, writes replies, events, dlq and expires
    ADMIN = "admin"  # a super user by the brokers' `super.users`; gets no ACL


@dataclass(frozen=True, order=True, slots=True)
class Acl:
    """One ALLOW binding for one principal, from any host."""

    resource_type: ResourceType
    resource_name: str
    pattern_type: PatternType
    operation: Operation

    def describe(self) -> str:
        pattern = "prefix " if self.pattern_type == PatternType.PREFIXED else ""
        return f"{self.operation.name} {self.resource_type.name.lower()} {pattern}{self.resource_name}"


class AccessError(RuntimeError):
    pass


def principal(name: str) -> str:
    return f"User:{name}"


def agent_reply_topic(topics: Topics, name: str) -> str:
    """An agent's own reply topic: other agents cannot read its replies (balances, holds)."""
    return f"{topics.replies}.{name}"


def role_acls(role: Role, topics: Topics, group_id: str, reply_topic: str | None = None) -> list[Acl]:
    """Exactly what each role needs, nothing else (DESCRIBE is implied by READ and WRITE in Kafka)."""
    def topic(name: str, *operations: Operation, pattern: PatternType = PatternType.LITERAL) -> list[Acl]:
        return [Acl(ResourceType.TOPIC, name, pattern, operation) for operation in operations]

    match role:
        case Role.AGENT:
            assert reply_topic, "an agent reads exactly one reply topic"
            return sorted(topic(topics.commands, Operation.WRITE) + topic(reply_topic, Operation.READ))
        case Role.WORKER:
            return sorted(
                # reads the commands in its group; writes the sweeper's expires; checks the topic's config
                topic(topics.commands, Operation.READ, Operation.WRITE, Operation.DESCRIBE_CONFIGS, Operation.CREATE)
                + [Acl(ResourceType.GROUP, group_id, PatternType.LITERAL, Operation.READ)]
                # the shared reply topic and every agent's own one, which all start with its name
                + topic(topics.replies, Operation.WRITE, Operation.CREATE, pattern=PatternType.PREFIXED)
                + topic(topics.events, Operation.WRITE, Operation.CREATE)
                + topic(topics.dlq, Operation.WRITE, Operation.CREATE)
            )
        case Role.ADMIN:
            return []


def new_password() -> str:
    return secrets.token_urlsafe(PASSWORD_BYTES)


def check_user(name: str, role: Role) -> None:
    if not USER_NAME.match(name):
        raise AccessError(f"a Kafka user name matches {USER_NAME.pattern}: {name!r} does not")
    if role == Role.ADMIN and name != KAFKA_ADMIN_USER:
        raise AccessError(f"the admin role is the brokers' super user {KAFKA_ADMIN_USER!r}; no other name has it")
    if role != Role.ADMIN and name == KAFKA_ADMIN_USER:
        raise AccessError(f"{KAFKA_ADMIN_USER!r} is the brokers' super user: use --role admin")


@dataclass(frozen=True)
class KafkaUser:
    name: str
    has_scram_sha_512: bool
    acls: tuple[Acl, ...]


class KafkaUsers:
    """`async with KafkaUsers(bootstrap, credentials) as users:` add, remove and list users.

    The connection must be a super user's: loopback PLAINTEXT on the local stack, or `admin`.
    """

    def __init__(self, bootstrap: str, credentials: KafkaCredentials | None = None) -> None:
        self._admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=ADMIN_TIMEOUT_MS,
                                          **kafka_client_options(credentials))  # fmt: skip

    async def __aenter__(self) -> KafkaUsers:
        await self._admin.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._admin.close()

    async def add(self, name: str, password: str, acls: Sequence[Acl]) -> None:
        """Create the user or change its password, then make its ACLs exactly `acls`."""
        salt = secrets.token_bytes(SCRAM_SALT_BYTES)
        salted = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, SCRAM_ITERATIONS)
        upsertion = (name, SCRAM_MECHANISM_SHA_512, SCRAM_ITERATIONS, salt, salted, {})
        response = await self._send(_AlterScram([], [upsertion]))
        _raise_errors((error_code, message) for _name, error_code, message, _tags in response.results)
        await self._set_acls(name, acls)
        await self._wait_applied(name, acls)

    async def _wait_applied(self, name: str, acls: Sequence[Acl]) -> None:
        """The controller commits a change; the broker applies it from the metadata log a moment
        later. Both answers below come from the broker's own copy, so once they show the change a
        client of this broker is judged by it."""
        deadline_s = time.monotonic() + APPLY_TIMEOUT_S
        while True:
            response = await self._send(_DescribeScram([name]))
            has_credential = any(user == name and not error_code for user, error_code, *_ in response.results)
            if has_credential and sorted(await self.acls_of(name)) == sorted(acls):
                return
            if time.monotonic() >= deadline_s:
                raise AccessError(f"the broker did not apply {name}'s credential and ACLs in {APPLY_TIMEOUT_S} s")
            await asyncio.sleep(APPLY_POLL_S)

    async def remove(self, name: str) -> bool:
        """Delete the user's SCRAM credential and every ACL of its principal; False if it had neither."""
        had_acls = bool(await self.acls_of(name))
        await self._set_acls(name, [])
        if name not in {user.name for user in await self.list()}:
            return had_acls
        response = await self._send(_AlterScram([(name, SCRAM_MECHANISM_SHA_512, {})], []))
        _raise_errors((error_code, message) for _name, error_code, message, _tags in response.results)
        return True

    async def list(self) -> list[KafkaUser]:
        """Every SCRAM user with its ACLs, by name."""
        response = await self._send(_DescribeScram(None))
        _raise_errors([(response.error_code, response.error_message)])
        users = []
        for name, error_code, message, credentials, _tags in sorted(response.results):
            _raise_errors([(error_code, message)])
            sha_512 = any(mechanism == SCRAM_MECHANISM_SHA_512 for mechanism, _iterations, _ in credentials)
            users.append(KafkaUser(name, sha_512, tuple(await self.acls_of(name))))
        return users

    async def acls_of(self, name: str) -> list[Acl]:
        request = _Prepared(DescribeAclsRequest_v1, ACL_RESOURCE_ANY, None, PatternType.ANY, principal(name),
                            None, Operation.ANY, Permission.ANY)  # fmt: skip
        response = await self._send(request)
        _raise_errors([(response.error_code, response.error_message)])
        found = []
        for resource_type, resource_name, pattern_type, bindings in response.resources:
            for _principal, _host, operation, permission in bindings:
                if permission == Permission.ALLOW:
                    found.append(Acl(ResourceType(resource_type), resource_name, PatternType(pattern_type),
                                     Operation(operation)))  # fmt: skip
        return sorted(found)

    async def create_reply_topic(self, topic: str, partitions: int) -> bool:
        """An agent's own reply topic, with the shared one's retention; False if it exists."""
        config = {"retention.ms": str(REPLIES_RETENTION_MS)}
        response = await self._admin.create_topics([NewTopic(topic, partitions, 1, topic_configs=config)])
        (name, error_code, *message) = response.topic_errors[0]  # the admin client returns errors, raises none
        if error_code == TopicAlreadyExistsError.errno:
            return False
        _raise_errors([(error_code, message[0] if message else None)])
        return True

    async def _set_acls(self, name: str, wanted: Sequence[Acl]) -> None:
        existing = set(await self.acls_of(name))
        missing = [acl for acl in wanted if acl not in existing]
        extra = [acl for acl in existing if acl not in set(wanted)]
        if missing:
            creations = [(acl.resource_type, acl.resource_name, acl.pattern_type, principal(name), ANY_HOST,
                          acl.operation, Permission.ALLOW) for acl in missing]  # fmt: skip
            response = await self._send(_Prepared(CreateAclsRequest_v1, creations))
            _raise_errors(response.creation_responses)
        if extra:
            filters = [(acl.resource_type, acl.resource_name, acl.pattern_type, principal(name), ANY_HOST,
                        acl.operation, Permission.ALLOW) for acl in extra]  # fmt: skip
            response = await self._send(_Prepared(DeleteAclsRequest_v1, filters))
            _raise_errors((error_code, message) for error_code, message, _matching in response.filter_responses)

    async def _send(self, request: Request) -> Any:
        return await _admin_send(self._admin)(request)


def _admin_send(admin: AIOKafkaAdminClient) -> Callable[[Request], Awaitable[Any]]:
    send = getattr(admin, "_send_request", None)  # aiokafka 0.14's own path: a random node, authenticated
    assert callable(send), "aiokafka's admin client changed: see worker/adapter/access.py"
    return send


def _raise_errors(results: Iterable[tuple[int, str | None]]) -> None:
    for error_code, message in results:
        if error_code:
            raise AccessError(f"{for_code(error_code).__name__}: {message or ''}".rstrip(": "))


class _Prepared(Request[RequestStruct]):
    """A request of one fixed struct version (the ACL requests' v1: PREFIXED patterns, many per request)."""

    API_KEY: ClassVar[int] = 0  # replaced per instance below

    def __init__(self, struct: type[RequestStruct], *fields: Any) -> None:
        self._struct = struct
        self._fields = fields

    def prepare(self, versions: dict[int, tuple[int, int]]) -> RequestStruct:
        lowest, highest = versions.get(self._struct.API_KEY, (0, -1))
        if not lowest <= self._struct.API_VERSION <= highest:
            raise AccessError(f"the broker does not take {self._struct.__name__}")
        return self.build(self._struct)

    def build(self, request_struct_class: type[RequestStruct]) -> RequestStruct:
        return request_struct_class(*self._fields)


# --- KIP-554: SCRAM credentials over the Admin API (flexible versions, v0) -----------------------


class _AlterScramResponse(Response):
    API_KEY = 51
    API_VERSION = 0
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        ("results", CompactArray(("user", CompactString("utf-8")), ("error_code", Int16),
                                 ("error_message", CompactString("utf-8")), ("tags", TaggedFields))),
        ("tags", TaggedFields),
    )  # fmt: skip


class _AlterScramStruct(RequestStruct):
    FLEXIBLE_VERSION = True
    API_KEY = 51
    API_VERSION = 0
    RESPONSE_TYPE = _AlterScramResponse
    SCHEMA = Schema(
        ("deletions", CompactArray(("name", CompactString("utf-8")), ("mechanism", Int8), ("tags", TaggedFields))),
        ("upsertions", CompactArray(("name", CompactString("utf-8")), ("mechanism", Int8), ("iterations", Int32),
                                    ("salt", CompactBytes), ("salted_password", CompactBytes), ("tags", TaggedFields))),
        ("tags", TaggedFields),
    )  # fmt: skip


class _DescribeScramResponse(Response):
    API_KEY = 50
    API_VERSION = 0
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        ("error_code", Int16),
        ("error_message", CompactString("utf-8")),
        ("results", CompactArray(
            ("user", CompactString("utf-8")), ("error_code", Int16), ("error_message", CompactString("utf-8")),
            ("credential_infos", CompactArray(("mechanism", Int8), ("iterations", Int32), ("tags", TaggedFields))),
            ("tags", TaggedFields))),
        ("tags", TaggedFields),
    )  # fmt: skip


class _DescribeScramStruct(RequestStruct):
    FLEXIBLE_VERSION = True
    API_KEY = 50
    API_VERSION = 0
    RESPONSE_TYPE = _DescribeScramResponse
    SCHEMA = Schema(
        ("users", CompactArray(("name", CompactString("utf-8")), ("tags", TaggedFields))),  # null: every user
        ("tags", TaggedFields),
    )


class _AlterScram(Request[_AlterScramStruct]):
    API_KEY = 51

    def __init__(self, deletions: list[tuple[Any, ...]], upsertions: list[tuple[Any, ...]]) -> None:
        self._deletions, self._upsertions = deletions, upsertions

    def build(self, request_struct_class: type[_AlterScramStruct]) -> _AlterScramStruct:
        return request_struct_class(self._deletions, self._upsertions, {})


class _DescribeScram(Request[_DescribeScramStruct]):
    API_KEY = 50

    def __init__(self, users: list[str] | None) -> None:
        self._users = users

    def build(self, request_struct_class: type[_DescribeScramStruct]) -> _DescribeScramStruct:
        users = None if self._users is None else [(name, {}) for name in self._users]
        return request_struct_class(users, {})
