"""`floorguard`: the operator's command line. Run `floorguard --help`."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shlex
import sys
from typing import Any

from worker import config
from worker.config import Settings

EXIT_REFUSED = 1
EXIT_FAILED = 2


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    chatty = args.run in (_worker, _run)  # a service logs its progress; a one-shot command only trouble
    logging.basicConfig(level=logging.INFO if chatty else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")  # fmt: skip
    try:
        return args.run(args)
    except config.Misconfigured as error:
        print(f"floorguard: {error}", file=sys.stderr)
        return EXIT_FAILED


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="floorguard", description="A prepaid hard cap for AI agents' spending.")
    parser.add_argument("--json", action="store_true", help="print replies as JSON, for scripts")
    parser.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS", help="wait per attempt for a reply")
    # The same two options after the command too (`floorguard charge W 5 --json`).
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON, for scripts")
    output.add_argument("--timeout", type=float, default=argparse.SUPPRESS, metavar="SECONDS", help="reply wait")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    stack = commands.add_parser("stack", help="the local Kafka and PostgreSQL (the embedded default)")
    stack.add_argument("action", choices=("up", "down", "status"))
    stack.set_defaults(run=_stack)
    commands.add_parser("migrate", help="apply the database migrations").set_defaults(run=_migrate)
    commands.add_parser("topics", help="create the topics with the contract's settings").set_defaults(run=_topics)
    running = argparse.ArgumentParser(add_help=False)
    running.add_argument("--processes", type=int, default=1, metavar="N",
                         help="worker processes in the group, each deciding its share of the partitions")  # fmt: skip
    worker = commands.add_parser("worker", help="run the worker in the foreground", parents=[running])
    worker.set_defaults(run=_worker)
    commands.add_parser("run", help="stack up, migrate, topics, then the worker", parents=[running]).set_defaults(run=_run)

    wallet = commands.add_parser("wallet", help="open, credit or show a wallet").add_subparsers(required=True, metavar="ACTION")
    opening = wallet.add_parser("open", help="open a wallet", parents=[output])
    opening.add_argument("wallet")
    opening.add_argument("--floor", type=int, default=0, help="lowest balance it may reach (≤ 0)")
    _command_options(opening)
    opening.set_defaults(run=lambda a: _send(a, "open", floor=a.floor))
    credit = wallet.add_parser("credit", help="add money to a wallet", parents=[output])
    credit.add_argument("wallet")
    credit.add_argument("amount", type=int)
    _command_options(credit)
    credit.set_defaults(run=lambda a: _send(a, "credit", amount=a.amount))
    show = wallet.add_parser("show", help="a wallet's balance, reserved, floor and available", parents=[output])
    show.add_argument("wallet")
    show.set_defaults(run=_show)

    charge = commands.add_parser("charge", help="spend from a wallet; refused with 402 past its floor", parents=[output])
    charge.add_argument("wallet")
    _money_options(charge)
    charge.set_defaults(run=lambda a: _send(a, "charge", **_money(a)))

    reserve = commands.add_parser("reserve", help="set money aside before a call (opens a hold)", parents=[output])
    reserve.add_argument("wallet")
    _money_options(reserve)
    reserve.add_argument("--ttl-ms", type=int, help="the hold's lifetime (default 300000)")
    reserve.set_defaults(run=lambda a: _send(a, "reserve", ttl_ms=a.ttl_ms, **_money(a)))
    extend = commands.add_parser("extend", help="grow an open hold", parents=[output])
    extend.add_argument("wallet")
    extend.add_argument("hold")
    extend.add_argument("amount", type=int)
    extend.add_argument("--ttl-ms", type=int, help="restart the hold's lifetime with this one")
    _command_options(extend)
    extend.set_defaults(run=lambda a: _send(a, "extend", hold=a.hold, amount=a.amount, ttl_ms=a.ttl_ms))
    capture = commands.add_parser("capture", help="spend from a hold; the rest is released", parents=[output])
    capture.add_argument("wallet")
    capture.add_argument("hold")
    _money_options(capture, required=False)
    capture.set_defaults(run=lambda a: _send(a, "capture", hold=a.hold, **_money(a)))
    release = commands.add_parser("release", help="give a hold back", parents=[output])
    release.add_argument("wallet")
    release.add_argument("hold")
    _command_options(release)
    release.set_defaults(run=lambda a: _send(a, "release", hold=a.hold))

    audit = commands.add_parser("audit", help="check the database and the events topic against the invariants")
    audit.add_argument("--events-topic", help="audit this copy of the events topic instead")
    audit.set_defaults(run=_audit)
    replay = commands.add_parser("replay", help="rebuild a ledger from the commands topic")
    replay.add_argument("--into", required=True, metavar="DATABASE_URL", help="an empty database to rebuild into")
    replay.add_argument("--verify", action="store_true", help="compare every decision and wallet with the live ledger")
    replay.set_defaults(run=_replay)
    tail = commands.add_parser("tail", help="follow the decisions on the events topic", parents=[output])
    tail.add_argument("--wallet", help="only this wallet's")
    tail.add_argument("--from-beginning", action="store_true", help="start at the oldest event, not now")
    tail.set_defaults(run=_tail)

    price = commands.add_parser("price", help="the price table for usage").add_subparsers(required=True, metavar="ACTION")
    add = price.add_parser("add", help="add a row: per million tokens, in the wallet's unit", parents=[output])
    add.add_argument("model")
    add.add_argument("--input", type=int, required=True, help="price of a million input tokens")
    add.add_argument("--output", type=int, required=True, help="price of a million output tokens")
    add.add_argument("--from", dest="valid_from", help="RFC 3339 start (default: a minute from now)")
    add.set_defaults(run=_price_add)
    price.add_parser("list", help="every row, oldest first", parents=[output]).set_defaults(run=_price_list)

    key = commands.add_parser("key", help="keys that sign commands (see docs/security.md)").add_subparsers(
        required=True, metavar="ACTION")  # fmt: skip
    create = key.add_parser("create", help="a new key; its secret is printed once", parents=[output])
    scope = create.add_mutually_exclusive_group(required=True)
    scope.add_argument("--wallet", help="a spend key: charge, reserve, extend, capture, release on this wallet only")
    scope.add_argument("--admin", action="store_true", help="an admin key: every op on every wallet")
    create.add_argument("--label", default="", help="who or what holds it (free text, not secret)")
    create.set_defaults(run=_key_create)
    key.add_parser("list", help="every key, its scope and whether it is revoked", parents=[output]).set_defaults(
        run=_key_list)  # fmt: skip
    revoke = key.add_parser("revoke", help="refuse every command signed with the key from now on")
    revoke.add_argument("key_id")
    revoke.set_defaults(run=_key_revoke)
    auth = commands.add_parser("auth", help="whether commands must be signed")
    auth.add_argument("action", choices=("status", "required", "off"),
                      help="show the mode, or switch it for every worker (workers started with "
                           f"{config.ENV_AUTH}=required switch it on themselves)")  # fmt: skip
    auth.set_defaults(run=_auth)
    users = commands.add_parser("kafka-user", help="Kafka's SCRAM users and their ACLs (docs/kafka-acls.md)")
    user_actions = users.add_subparsers(required=True, metavar="ACTION")
    adding = user_actions.add_parser("add", help="create a user or change its password; its ACLs become its role's")
    adding.add_argument("name")
    adding.add_argument("--role", required=True, choices=("agent", "worker", "admin"),
                        help="agent: write commands, read its reply topic; worker: what a worker needs; "
                             "admin: the brokers' super user")  # fmt: skip
    adding.add_argument("--reply-topic", metavar="TOPIC",
                        help="an agent's reply topic (default <prefix>.replies.<name>, created if missing)")
    secret = adding.add_mutually_exclusive_group()
    secret.add_argument("--password-stdin", action="store_true", help="read the password from stdin's first line")
    secret.add_argument("--password-file", metavar="PATH", help="read the password from a file's first line")
    adding.set_defaults(run=_kafka_user_add)
    removing = user_actions.add_parser("remove", help="delete a user's credential and all its ACLs")
    removing.add_argument("name")
    removing.set_defaults(run=_kafka_user_remove)
    user_actions.add_parser("list", help="every SCRAM user and its ACLs", parents=[output]).set_defaults(run=_kafka_user_list)
    return parser


def _money_options(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("amount", type=int, nargs=None if required else "?", help="in the wallet's unit")
    parser.add_argument("--model", help="price usage instead of an amount: the model")
    parser.add_argument("--input-tokens", type=int, default=0)
    parser.add_argument("--output-tokens", type=int, default=0)
    _command_options(parser)


def _money(args: argparse.Namespace) -> dict[str, Any]:
    if args.model is None:
        return {"amount": args.amount}
    usage = {"model": args.model, "input_tokens": args.input_tokens, "output_tokens": args.output_tokens}
    return {"usage": usage, "amount": None}


def _command_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--id", help="the idempotency key (default: a new UUID); reuse it to retry safely")
    parser.add_argument("--memo", help="free text stored with the decision")


def settings() -> Settings:
    """The user's services when both variables are set; else the local stack, started if needed."""
    if config.endpoints_in_env():
        return Settings.from_env()
    from worker import stack

    endpoints = stack.up()
    if not os.environ.get(config.ENV_MASTER_SECRET) and not os.environ.get(config.ENV_MASTER_SECRET_FILE):
        os.environ[config.ENV_MASTER_SECRET_FILE] = str(stack.master_secret_file())
    return Settings.from_env(endpoints.kafka_bootstrap, endpoints.database_url)


# --- services ---------------------------------------------------------------------------------


def _stack(args: argparse.Namespace) -> int:
    from worker import stack

    if args.action == "up":
        if config.endpoints_in_env():
            endpoints = Settings.from_env()
        else:
            endpoints = stack.up()
            print(f"export {config.ENV_MASTER_SECRET_FILE}={shlex.quote(str(stack.master_secret_file()))}")
        print(f"export {config.ENV_KAFKA_BOOTSTRAP}={shlex.quote(endpoints.kafka_bootstrap)}")
        print(f"export {config.ENV_DATABASE_URL}={shlex.quote(endpoints.database_url)}")
    elif args.action == "down":
        stack.down()
    else:
        print("\n".join(stack.status()))
    return 0


def _migrate(args: argparse.Namespace) -> int:
    from worker.store.migrate import migrate

    applied = asyncio.run(migrate(settings().database_url))
    print(f"applied {', '.join(applied)}" if applied else "the database is up to date")
    return 0


def _topics(args: argparse.Namespace) -> int:
    from worker.adapter.topics import create_topics

    current = settings()
    created = asyncio.run(create_topics(current.kafka_bootstrap, current.topics, current.partitions,
                                        current.kafka_credentials))  # fmt: skip
    print(f"created {', '.join(created)}" if created else "the topics exist")
    return 0


def _worker(args: argparse.Namespace) -> int:
    if args.processes > 1:
        from worker.supervisor import supervise

        return supervise(args.processes, settings())
    import uvloop

    from worker.adapter.app import build_app

    try:
        uvloop.run(build_app(settings()).run())
    except KeyboardInterrupt:
        pass
    return 0


def _run(args: argparse.Namespace) -> int:
    current = settings()
    os.environ[config.ENV_KAFKA_BOOTSTRAP] = current.kafka_bootstrap
    os.environ[config.ENV_DATABASE_URL] = current.database_url
    _migrate(args)
    _topics(args)
    print(_FIRST_STEPS.format(bootstrap=current.kafka_bootstrap, database=current.database_url), file=sys.stderr)
    return _worker(args)


_FIRST_STEPS = """
floorguard is starting on Kafka {bootstrap} and {database}.
In another terminal, send a first command:

    eval "$(.venv/bin/floorguard stack up)"
    .venv/bin/floorguard wallet open agent-7 && .venv/bin/floorguard wallet credit agent-7 1000000000
    .venv/bin/floorguard charge agent-7 25000000

Ctrl-C stops the worker; `.venv/bin/floorguard stack down` stops Kafka and PostgreSQL.
"""


# --- commands over Kafka ------------------------------------------------------------------------


def _send(args: argparse.Namespace, op: str, **fields: Any) -> int:
    from floorguard.ledger import Ledger, build_command

    current = settings()
    command = build_command(op, args.wallet, args.id, args.memo, **fields)

    async def send() -> Any:
        async with Ledger(current.kafka_bootstrap, topic_prefix=current.topics.prefix, timeout_s=args.timeout,
                          key=os.environ.get(config.ENV_KEY) or None, **_ledger_security(current)) as ledger:  # fmt: skip
            return await ledger.send(command, raise_on_refusal=False)

    reply = asyncio.run(send())
    if args.json:
        print(reply.model_dump_json(exclude_unset=True))  # the reply as it came, nulls included
    else:
        print(_readable(reply))
    return 0 if reply.ok else EXIT_REFUSED


def _ledger_security(current: Settings) -> dict[str, Any]:
    credentials = current.kafka_credentials
    if credentials is None:
        return {}
    return {"sasl_username": credentials.username, "sasl_password": credentials.password,
            "security_protocol": credentials.security_protocol, "ssl_context": credentials.ssl_context()}  # fmt: skip


def _readable(reply: Any) -> str:
    head = f"{reply.op} {reply.wallet} {reply.id}: " + ("accepted" if reply.ok else f"refused {reply.status} {reply.error}")
    lines = [head + (" (duplicate)" if reply.duplicate else "")]
    if reply.message:
        lines.append(f"  {reply.message}")
    if reply.hold:
        lines.append(f"  hold      {reply.hold} until {reply.expires_at}")
    for name in ("amount", "balance", "reserved", "available", "seq"):
        value = getattr(reply, name)
        if value is not None:
            lines.append(f"  {name:<9} {value:>22,}")
    lines.append(f"  at        {reply.at:>22}")
    return "\n".join(lines)


def _audit(args: argparse.Namespace) -> int:
    from worker.audit import VIOLATIONS_SHOWN_MAX, audit

    current = settings()
    events_topic = args.events_topic or current.topics.events
    report = asyncio.run(audit(current.database_url, current.kafka_bootstrap, current.topics.commands, events_topic,
                               credentials=current.kafka_credentials))  # fmt: skip
    summary = (f"audit: {report.wallets:,} wallets, {report.decisions:,} decisions, {report.events:,} events: "
               + ("all invariants hold" if report.ok else f"{len(report.violations):,} violations"))  # fmt: skip
    print(summary)
    for violation in report.violations[:VIOLATIONS_SHOWN_MAX]:
        print(f"  {violation}")
    return 0 if report.ok else EXIT_REFUSED


def _replay(args: argparse.Namespace) -> int:
    from worker.replay import NotEmpty, replay, verify

    current = settings()
    try:
        result = asyncio.run(replay(current.kafka_bootstrap, current.topics, current.database_url, args.into,
                                    master_secret=current.master_secret,
                                    credentials=current.kafka_credentials))  # fmt: skip
    except NotEmpty as error:
        print(f"floorguard replay: {error}", file=sys.stderr)
        return EXIT_FAILED
    print(f"replayed {result.commands:,} commands in {result.seconds:,.1f} s ({result.rate_per_s:,.0f} commands/s)")
    if not args.verify:
        return 0
    divergence = asyncio.run(verify(current.database_url, args.into, current.topics, result.ends))
    print("verify: the rebuilt ledger is identical" if divergence is None else f"verify: first divergence: {divergence}")
    return 0 if divergence is None else EXIT_REFUSED


def _tail(args: argparse.Namespace) -> int:
    from worker.adapter.streams import follow

    current = settings()

    async def run() -> None:
        async for record in follow(current.kafka_bootstrap, current.topics.events, args.from_beginning,
                                   current.kafka_credentials):  # fmt: skip
            event = json.loads(record.value)
            if args.wallet and event.get("wallet") != args.wallet:
                continue
            print(record.value.decode() if args.json else _event_line(event), flush=True)

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass
    return 0


def _event_line(event: dict[str, Any]) -> str:
    outcome = "ok " if event["ok"] else f"{event['status']} {event['error']}"
    amount = f" {event['amount']:,}" if event.get("amount") is not None else ""
    return (f"{event['at']}  {event['wallet']:<20} #{event['seq']:<6} {event['op']:<8}{amount:>16}  {outcome:<24}"
            f" balance {event['balance']:,} available {event['available']:,}  ({event['id']})")  # fmt: skip


PRICE_LEAD_MS = 5_000  # a new row starts at least this far ahead, so no decision already made moves
PRICE_DEFAULT_LEAD_MS = 60_000


def _price_add(args: argparse.Namespace) -> int:
    from datetime import datetime, timezone

    from worker.core.model import Price
    from worker.store.store import Store

    if args.valid_from:
        start = datetime.fromisoformat(args.valid_from.replace("Z", "+00:00"))
        valid_from_ms = int(start.astimezone(timezone.utc).timestamp() * 1000)
    else:
        valid_from_ms = int(datetime.now(timezone.utc).timestamp() * 1000) + PRICE_DEFAULT_LEAD_MS
    row = Price(args.model, valid_from_ms, args.input, args.output)

    async def add() -> bool:
        store = await Store.connect(settings().database_url, pool_size_max=1)
        try:
            return await store.add_price(row, PRICE_LEAD_MS)
        finally:
            await store.close()

    if not asyncio.run(add()):
        print(f"refused: a price must start at least {PRICE_LEAD_MS} ms from now, or a row exists for that start",
              file=sys.stderr)  # fmt: skip
        return EXIT_REFUSED
    print(json.dumps(_price_json(row)) if args.json else f"added {_price_line(row)}")
    return 0


def _price_list(args: argparse.Namespace) -> int:
    from worker.store.store import Store

    async def rows() -> list[Any]:
        store = await Store.connect(settings().database_url, pool_size_max=1)
        try:
            return await store.prices()
        finally:
            await store.close()

    for row in asyncio.run(rows()):
        print(json.dumps(_price_json(row)) if args.json else _price_line(row))
    return 0


def _price_json(row: Any) -> dict[str, Any]:
    from worker.core.decide import format_time

    return {"model": row.model, "valid_from": format_time(row.valid_from_ms), "input_price": row.input_price,
            "output_price": row.output_price}  # fmt: skip


def _price_line(row: Any) -> str:
    shown = _price_json(row)
    return f"{shown['model']:<24} from {shown['valid_from']}  input {row.input_price:,}  output {row.output_price:,}"


# --- keys and authentication -------------------------------------------------------------------


async def _with_connection(database_url: str, action: Any) -> Any:
    from worker.store import books

    connection = await books.connect(database_url)
    try:
        return await action(connection)
    finally:
        await connection.close()


def _master(current: Settings) -> bytes:
    """The master secret: named by the environment, else the local stack's (see `settings`)."""
    master = current.master_secret
    if master is None:
        raise config.Misconfigured(f"keys are derived from the master secret: set {config.ENV_MASTER_SECRET_FILE} "
                                   f"or {config.ENV_MASTER_SECRET}")  # fmt: skip
    return master


def _key_create(args: argparse.Namespace) -> int:
    from worker.core.auth import Scope
    from worker.store import keys

    current = settings()  # starts the local stack, and names its master secret, when nothing else names one
    master = _master(current)
    scope = Scope.ADMIN if args.admin else Scope.WALLET
    try:
        made = asyncio.run(_with_connection(current.database_url,
                                            lambda c: keys.create_key(c, master, scope, args.wallet, args.label)))
    except keys.WrongMasterSecret as error:
        raise config.Misconfigured(str(error)) from None
    if args.json:
        print(json.dumps({**_key_json(made.key), "secret": made.secret}))
    else:
        print(f"key {made.key.key_id} ({_scope_text(made.key)}), valid from {_time(made.key.valid_from_ms)}")
        print("its secret is shown this once and stored nowhere; give it to the key's holder now:")
        print(f"export {config.ENV_KEY}={made.key.key_id}:{made.secret}")
    return 0


def _key_list(args: argparse.Namespace) -> int:
    from worker.store import keys

    for row in asyncio.run(_with_connection(settings().database_url, keys.list_keys)):
        if args.json:
            print(json.dumps(_key_json(row)))
        else:
            state = f"revoked {_time(row.revoked_at_ms)}" if row.revoked_at_ms is not None else "active"
            print(f"{row.key_id:<26} {_scope_text(row):<32} {state:<34} {row.label}")
    return 0


def _key_revoke(args: argparse.Namespace) -> int:
    from worker.store import keys

    revoked_at_ms = asyncio.run(_with_connection(settings().database_url, lambda c: keys.revoke_key(c, args.key_id)))
    if revoked_at_ms is None:
        print(f"no active key {args.key_id}", file=sys.stderr)
        return EXIT_REFUSED
    print(f"revoked {args.key_id}: every command it signs from {_time(revoked_at_ms)} on is refused (401)")
    return 0


def _auth(args: argparse.Namespace) -> int:
    from worker.store import keys

    current = settings()
    if args.action == "status":
        print(asyncio.run(_with_connection(current.database_url, keys.current_mode)))
        return 0
    if args.action == "required":
        master = _master(current)

        async def switch_on(connection: Any) -> int | None:
            await keys.check_master(connection, master)
            await keys.ensure_sweeper_key(connection, master)
            return await keys.set_mode(connection, "required")

        valid_from_ms = asyncio.run(_with_connection(current.database_url, switch_on))
    else:
        valid_from_ms = asyncio.run(_with_connection(current.database_url, lambda c: keys.set_mode(c, "off")))
    if valid_from_ms is None:
        print(f"authentication is {args.action} already")
    else:
        print(f"authentication {args.action} for every command from {_time(valid_from_ms)} on")
    return 0


def _key_json(row: Any) -> dict[str, Any]:
    return {"key_id": row.key_id, "scope": row.scope.value, "wallet": row.wallet, "label": row.label,
            "valid_from": _time(row.valid_from_ms),
            "revoked_at": None if row.revoked_at_ms is None else _time(row.revoked_at_ms)}  # fmt: skip


def _scope_text(row: Any) -> str:
    return {"wallet": f"spends from {row.wallet}", "admin": "admin", "expire": "expires holds"}[row.scope.value]


def _time(at_ms: int) -> str:
    from worker.core.decide import format_time

    return format_time(at_ms)


def _show(args: argparse.Namespace) -> int:
    from worker.store.store import Store

    async def show() -> Any:
        store = await Store.connect(settings().database_url, pool_size_max=1)
        try:
            return await store.show_wallet(args.wallet)
        finally:
            await store.close()

    wallet = asyncio.run(show())
    if wallet is None:
        print(json.dumps({"wallet": args.wallet, "error": "wallet_not_found"}) if args.json else f"no wallet {args.wallet}")
        return EXIT_REFUSED
    shown = {"wallet": wallet.wallet, "balance": wallet.balance, "reserved": wallet.reserved,
             "floor": wallet.floor, "available": wallet.available, "seq": wallet.seq}  # fmt: skip
    if args.json:
        print(json.dumps(shown))
    else:
        print("\n".join(f"{name:<9} {value:>22,}" if isinstance(value, int) else f"{name:<9} {value}" for name, value in shown.items()))
    return 0


# --- Kafka's users and ACLs -----------------------------------------------------------------------

AGENT_REPLY_TOPIC_PARTITIONS = 1  # one agent's replies; many agents must not multiply the broker's partitions


def _kafka_user_add(args: argparse.Namespace) -> int:
    from worker.adapter.access import AccessError, Role, agent_reply_topic, check_user, new_password, role_acls

    current = settings()
    role = Role(args.role)
    reply_topic = None
    try:
        check_user(args.name, role)
        if role == Role.AGENT:
            reply_topic = args.reply_topic or agent_reply_topic(current.topics, args.name)
            if not reply_topic.startswith(current.topics.replies):
                raise AccessError(f"a reply topic starts with {current.topics.replies}: the workers write no other")
        elif args.reply_topic:
            raise AccessError("--reply-topic is an agent's")
        generated = not (args.password_stdin or args.password_file)
        password = _password(args) if not generated else new_password()
    except (AccessError, config.SettingsError, OSError) as error:
        print(f"floorguard kafka-user: {error}", file=sys.stderr)
        return EXIT_FAILED
    acls = role_acls(role, current.topics, current.group_id, reply_topic)
    created = asyncio.run(_add_user(current, args.name, password, acls, reply_topic))
    if created:
        print(f"created {reply_topic}", file=sys.stderr)
    print(f"{args.name} ({role}): " + (", ".join(acl.describe() for acl in acls) or "no ACL, a super user"),
          file=sys.stderr)  # fmt: skip
    if generated:
        print(password)  # the only time it is shown: stdout alone, so that a script can capture it
    return 0


async def _add_user(current: Settings, name: str, password: str, acls: list[Any], reply_topic: str | None) -> bool:
    from worker.adapter.access import KafkaUsers

    async with KafkaUsers(current.kafka_bootstrap, current.kafka_credentials) as users:
        created = False
        if reply_topic is not None:
            created = await users.create_reply_topic(reply_topic, AGENT_REPLY_TOPIC_PARTITIONS)
        await users.add(name, password, acls)
        return created


def _password(args: argparse.Namespace) -> str:
    if args.password_file:
        return config.read_password_file(args.password_file)
    line = sys.stdin.readline(config.PASSWORD_FILE_SIZE_MAX).rstrip("\r\n")
    if not line:
        raise config.SettingsError("no password on stdin")
    return line


def _kafka_user_remove(args: argparse.Namespace) -> int:
    from worker.adapter.access import KafkaUsers

    current = settings()

    async def remove() -> bool:
        async with KafkaUsers(current.kafka_bootstrap, current.kafka_credentials) as users:
            return await users.remove(args.name)

    if not asyncio.run(remove()):
        print(f"no Kafka user {args.name}", file=sys.stderr)
        return EXIT_REFUSED
    print(f"removed {args.name}", file=sys.stderr)
    return 0


def _kafka_user_list(args: argparse.Namespace) -> int:
    from worker.adapter.access import KafkaUsers

    current = settings()

    async def listed() -> list[Any]:
        async with KafkaUsers(current.kafka_bootstrap, current.kafka_credentials) as users:
            return await users.list()

    for user in asyncio.run(listed()):
        acls = [acl.describe() for acl in user.acls]
        if args.json:
            print(json.dumps({"name": user.name, "scram_sha_512": user.has_scram_sha_512, "acls": acls}))
        else:
            print(f"{user.name}: " + (", ".join(acls) or "no ACL"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
