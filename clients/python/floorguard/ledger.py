"""Send a command, await its reply by correlation id; retry a timeout under the same command id."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import ssl
import uuid
from types import TracebackType
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from floorguard.errors import ReplyTimeout, refusal
from floorguard.reply import Reply
from floorguard.usage import Usage

CONTRACT_VERSION = 1
TIMEOUT_DEFAULT_S = 10.0
ATTEMPTS_DEFAULT = 3
REPLY_POLL_MS = 100
CONNECT_TIMEOUT_S = 30.0
SASL_MECHANISM = "SCRAM-SHA-512"  # the mechanism of the brokers' SASL listener (docs/kafka-acls.md)


class Ledger:
    """A connection to floorguard for one agent or operator. Use as `async with Ledger(...)`.

    Replies come on `reply_topic` (default `<prefix>.replies`); the client reads every partition
    of it from the moment it starts and keeps those whose correlation id it is waiting for.

    `key` is `<key_id>:<secret>` as `floorguard key create` printed it: every command is then
    signed (the `auth` header: the HMAC-SHA256 of the value under the secret).

    On a broker that guards itself with ACLs, give the agent's SCRAM user (`sasl_username`,
    `sasl_password`) and its own reply topic: it may write the commands topic and read that topic,
    nothing else. `security_protocol` is SASL_PLAINTEXT by default with a user, or SASL_SSL
    (with `ssl_context`, default: the system's trusted CAs).
    """

    def __init__(
        self,
        bootstrap: str,
        *,
        topic_prefix: str = "floorguard",
        reply_topic: str | None = None,
        timeout_s: float = TIMEOUT_DEFAULT_S,
        attempts: int = ATTEMPTS_DEFAULT,
        key: str | None = None,
        sasl_username: str | None = None,
        sasl_password: str | None = None,
        security_protocol: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        assert attempts >= 1 and timeout_s > 0
        self._key_id, self._secret = _split_key(key) if key else (None, None)
        self._bootstrap = bootstrap
        self._security = _security_options(sasl_username, sasl_password, security_protocol, ssl_context)
        self.commands_topic = f"{topic_prefix}.commands"
        self.reply_topic = reply_topic or f"{topic_prefix}.replies"
        self._timeout_s = timeout_s
        self._attempts = attempts
        self._waiting: dict[str, asyncio.Future[Reply]] = {}
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Ledger:
        await self.start()
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        trace: TracebackType | None) -> None:  # fmt: skip
        await self.close()

    async def start(self) -> None:
        self._producer = AIOKafkaProducer(bootstrap_servers=self._bootstrap, acks="all", enable_idempotence=True,
                                          **self._security)  # fmt: skip
        self._consumer = AIOKafkaConsumer(bootstrap_servers=self._bootstrap, enable_auto_commit=False, **self._security)
        await asyncio.wait_for(self._producer.start(), CONNECT_TIMEOUT_S)
        await asyncio.wait_for(self._consumer.start(), CONNECT_TIMEOUT_S)
        partitions = (await self._producer.partitions_for(self.reply_topic)) or set()
        assignment = [TopicPartition(self.reply_topic, p) for p in sorted(partitions)]
        assert assignment, f"reply topic {self.reply_topic} has no partitions"
        self._consumer.assign(assignment)
        await self._consumer.seek_to_end(*assignment)
        for tp in assignment:  # pin the end now, so that no reply sent after start is missed
            await self._consumer.position(tp)
        self._reader = asyncio.create_task(self._read_replies())

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        for client in (self._consumer, self._producer):
            if client is not None:
                await client.stop()

    # --- operations ------------------------------------------------------------------------------

    async def open(self, wallet: str, *, floor: int = 0, id: str | None = None, memo: str | None = None) -> Reply:
        return await self.send(build_command("open", wallet, id, memo, floor=floor))

    async def credit(self, wallet: str, amount: int, *, id: str | None = None, memo: str | None = None) -> Reply:
        return await self.send(build_command("credit", wallet, id, memo, amount=amount))

    async def charge(self, wallet: str, amount: int, *, id: str | None = None, memo: str | None = None) -> Reply:
        return await self.send(build_command("charge", wallet, id, memo, amount=amount))

    async def charge_usage(self, wallet: str, usage: Usage, *, id: str | None = None, memo: str | None = None) -> Reply:
        """Charge what a model call used, priced by the ledger's table (`usage_from(response)`)."""
        return await self.send(build_command("charge", wallet, id, memo, usage=usage.as_wire()))

    async def reserve(self, wallet: str, amount: int | None = None, *, usage: Usage | None = None,
                      ttl_ms: int | None = None, id: str | None = None, memo: str | None = None) -> Reply:  # fmt: skip
        """Set money aside before a call; by amount, or by a usage estimate priced by the ledger."""
        return await self.send(build_command("reserve", wallet, id, memo, amount=amount, ttl_ms=ttl_ms,
                                             usage=usage.as_wire() if usage else None))  # fmt: skip

    async def extend(self, wallet: str, hold: str, amount: int, *, ttl_ms: int | None = None,
                     id: str | None = None, memo: str | None = None) -> Reply:  # fmt: skip
        return await self.send(build_command("extend", wallet, id, memo, hold=hold, amount=amount, ttl_ms=ttl_ms))

    async def capture(self, wallet: str, hold: str, amount: int | None = None, *, usage: Usage | None = None,
                      id: str | None = None, memo: str | None = None) -> Reply:  # fmt: skip
        """Spend from a hold (default: all of it); what is left of the hold is released."""
        return await self.send(build_command("capture", wallet, id, memo, hold=hold, amount=amount,
                                             usage=usage.as_wire() if usage else None))  # fmt: skip

    async def release(self, wallet: str, hold: str, *, id: str | None = None, memo: str | None = None) -> Reply:
        return await self.send(build_command("release", wallet, id, memo, hold=hold))

    def hold(self, wallet: str, estimate: int | None = None, *, usage: Usage | None = None,
             ttl_ms: int | None = None) -> HeldCall:  # fmt: skip
        """`async with ledger.hold(wallet, estimate=…) as hold:` reserve → call → capture.

        The body records what the call cost (`hold.cost(amount)` or `hold.usage(usage_from(r))`);
        on a clean exit that is captured, on an exception the hold is released. Streams grow the
        hold as they go with `await hold.extend(amount)`.
        """
        return HeldCall(self, wallet, estimate, usage, ttl_ms)

    async def send(self, command: dict[str, Any], *, raise_on_refusal: bool = True) -> Reply:
        """Send one command and return its reply; a refusal raises its typed error by default.

        Each attempt that times out sends the very same command again (same id, same
        correlation id), so however many attempts reach the ledger, one decision is made.
        """
        assert self._producer is not None, "use `async with Ledger(...)` or call start()"
        value = json.dumps(command, separators=(",", ":")).encode()
        correlation_id = uuid.uuid4().hex
        headers = [("reply_to", self.reply_topic.encode()), ("correlation_id", correlation_id.encode())]
        if self._secret is not None:
            digest = hmac.new(self._secret, value, hashlib.sha256).hexdigest()
            headers.append(("auth", f"{self._key_id}.{digest}".encode()))
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._waiting[correlation_id] = future
        try:
            for _ in range(self._attempts):
                await self._producer.send_and_wait(
                    self.commands_topic,
                    value=value,
                    key=command["wallet"].encode(),
                    headers=headers,
                )
                try:
                    reply = await asyncio.wait_for(asyncio.shield(future), self._timeout_s)
                except asyncio.TimeoutError:
                    continue
                if raise_on_refusal and not reply.ok:
                    raise refusal(reply)
                return reply
        finally:
            self._waiting.pop(correlation_id, None)
        raise ReplyTimeout(command["id"], self._attempts, self._timeout_s)

    async def _read_replies(self) -> None:
        assert self._consumer is not None
        while True:
            batches = await self._consumer.getmany(timeout_ms=REPLY_POLL_MS)
            for records in batches.values():
                for record in records:
                    self._resolve(record.headers, record.value)

    def _resolve(self, headers: Any, value: bytes | None) -> None:
        correlation_id = next((v.decode(errors="replace") for k, v in headers or () if k == "correlation_id"), None)
        future = self._waiting.get(correlation_id or "")
        if future is None or future.done():
            return
        future.set_result(Reply.model_validate_json(value or b"{}"))


def _split_key(key: str) -> tuple[str, bytes]:
    key_id, colon, secret = key.partition(":")
    if not colon or not key_id or not secret:
        raise ValueError("a key is <key_id>:<secret>, as `floorguard key create` prints it")
    return key_id, secret.encode()  # the HMAC key is the secret's ASCII bytes, exactly as printed


class HeldCall:
    """The reserve → call → capture pattern as a context manager; see `Ledger.hold`."""

    def __init__(self, ledger: Ledger, wallet: str, estimate: int | None, usage: Usage | None,
                 ttl_ms: int | None) -> None:  # fmt: skip
        assert (estimate is None) != (usage is None), "give an estimate or a usage estimate"
        self._ledger, self.wallet = ledger, wallet
        self._estimate, self._estimated_usage, self._ttl_ms = estimate, usage, ttl_ms
        self.id = ""
        self.reserved: Reply | None = None
        self.closed: Reply | None = None
        self._cost: int | None = None
        self._usage: Usage | None = None

    async def __aenter__(self) -> HeldCall:
        self.reserved = await self._ledger.reserve(self.wallet, self._estimate, usage=self._estimated_usage,
                                                   ttl_ms=self._ttl_ms)  # fmt: skip
        self.id = self.reserved.hold or self.reserved.id or ""
        return self

    def cost(self, amount: int) -> None:
        """What the call cost, in the wallet's unit: captured on a clean exit."""
        self._cost, self._usage = amount, None

    def usage(self, usage: Usage) -> None:
        """What the call used: priced by the ledger's table and captured on a clean exit."""
        self._usage, self._cost = usage, None

    async def extend(self, amount: int, *, ttl_ms: int | None = None) -> Reply:
        return await self._ledger.extend(self.wallet, self.id, amount, ttl_ms=ttl_ms)

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        trace: TracebackType | None) -> None:  # fmt: skip
        if kind is not None:
            self.closed = await self._ledger.release(self.wallet, self.id)
            return
        # Nothing recorded means the whole estimate was spent: the safe reading for a budget.
        self.closed = await self._ledger.capture(self.wallet, self.id, self._cost, usage=self._usage)


def _security_options(username: str | None, password: str | None, protocol: str | None,
                      context: ssl.SSLContext | None) -> dict[str, Any]:  # fmt: skip
    """aiokafka's keyword arguments: none without a user (PLAINTEXT), SCRAM-SHA-512 with one."""
    if username is None and password is None:
        assert protocol in (None, "PLAINTEXT"), f"{protocol} needs sasl_username and sasl_password"
        return {}
    assert username and password, "give both sasl_username and sasl_password"
    protocol = protocol or "SASL_PLAINTEXT"
    assert protocol in ("SASL_PLAINTEXT", "SASL_SSL"), f"a SASL user connects over SASL_PLAINTEXT or SASL_SSL, not {protocol}"
    options: dict[str, Any] = {"security_protocol": protocol, "sasl_mechanism": SASL_MECHANISM,
                               "sasl_plain_username": username, "sasl_plain_password": password}  # fmt: skip
    if protocol == "SASL_SSL":
        options["ssl_context"] = context or ssl.create_default_context()
    return options


def build_command(op: str, wallet: str, command_id: str | None, memo: str | None, **fields: Any) -> dict[str, Any]:
    command: dict[str, Any] = {"v": CONTRACT_VERSION, "op": op, "id": command_id or str(uuid.uuid4()), "wallet": wallet}
    command.update({name: value for name, value in fields.items() if value is not None})
    if memo is not None:
        command["memo"] = memo
    return command
