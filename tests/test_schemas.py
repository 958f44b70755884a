"""The wire contract's schemas, its shared vectors and the examples in docs/contract.md agree.

The worker's own contract test (every message it produces validated against these schemas, every
vector run through a real worker) lives with the worker; this file checks the contract files alone.
"""

from __future__ import annotations

import copy
import json
import pathlib
import re
from dataclasses import dataclass, field
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from referencing import Registry, Resource

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCHEMAS = ROOT / "schemas"
VECTOR_FILES = sorted((SCHEMAS / "vectors").glob("*.json"))
CONTRACT_DOC = ROOT / "docs" / "contract.md"

KINDS = ("command", "reply", "event")
EXACT_INTEGER_MAX = 2**53 - 1
VALUE_SIZE_MAX_BYTES = 16 * 1024
TTL_MS_DEFAULT = 300_000
SAMPLE_AT = "2026-11-23T10:00:00.123Z"

# A 422 whose message names one of these is about the record around the value (its key, its
# headers, its bytes), so the value alone, checked against command.schema.json, cannot show it.
NOT_VALUE_FIELDS = frozenset({"key", "value", "reply_to", "correlation_id", "reply_partition", "auth"})
DECIDED_STATUSES = frozenset({200, 402, 404, 409})
UNSTORED_ERRORS = frozenset({"wallet_not_found", "idempotency_conflict", "hold_not_expired"})


def load_json(path: pathlib.Path) -> Any:
    """json.load that refuses duplicate keys, so no file of the contract is ambiguous."""

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [key for key, _ in pairs]
        assert len(keys) == len(set(keys)), f"{path}: duplicate key among {keys}"
        return dict(pairs)

    return json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=no_duplicates)


SCHEMA_DOCUMENTS = {kind: load_json(SCHEMAS / f"{kind}.schema.json") for kind in KINDS}
REGISTRY = Registry().with_resources(
    (document["$id"], Resource.from_contents(document)) for document in SCHEMA_DOCUMENTS.values()
)
VALIDATORS = {
    kind: Draft202012Validator(
        document, registry=REGISTRY, format_checker=Draft202012Validator.FORMAT_CHECKER
    )
    for kind, document in SCHEMA_DOCUMENTS.items()
}


def errors(kind: str, instance: Any) -> list[str]:
    return [error.message for error in VALIDATORS[kind].iter_errors(instance)]


# ---------------------------------------------------------------------------------- the schemas


@pytest.mark.parametrize("kind", KINDS)
def test_schema_is_valid_draft_2020_12(kind: str) -> None:
    document = SCHEMA_DOCUMENTS[kind]
    assert document["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert document["$id"] == f"urn:floorguard:wire:v1:{kind}"
    Draft202012Validator.check_schema(document)


def test_every_integer_in_the_schemas_is_bounded_within_exact_range() -> None:
    """Every "type": "integer" carries (or inherits through $ref) a minimum and a maximum."""

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            if node.get("type") == "integer":
                bounded = ("minimum" in node or "const" in node or "enum" in node) and (
                    "maximum" in node or "const" in node or "enum" in node
                )
                assert bounded, f"unbounded integer at {where}"
                for bound in ("minimum", "maximum"):
                    if bound in node:
                        assert abs(node[bound]) <= EXACT_INTEGER_MAX, where
            for key, child in node.items():
                walk(child, f"{where}/{key}")
        elif isinstance(node, list):
            for index, child in enumerate(node):
                walk(child, f"{where}/{index}")

    for kind, document in SCHEMA_DOCUMENTS.items():
        walk(document, kind)


# ------------------------------------------------------------------------------ sample commands

COMMANDS_VALID = {
    "open": {"v": 1, "op": "open", "id": "open-1", "wallet": "agent-7"},
    "open with floor and memo": {"v": 1, "op": "open", "id": "o", "wallet": "w", "floor": -500, "memo": "m"},
    "credit": {"v": 1, "op": "credit", "id": "c", "wallet": "w", "amount": 1},
    "charge with amount": {"v": 1, "op": "charge", "id": "c", "wallet": "w", "amount": EXACT_INTEGER_MAX},
    "charge with usage": {
        "v": 1, "op": "charge", "id": "c", "wallet": "w",
        "usage": {"model": "gpt-x", "input_tokens": 0, "output_tokens": 10},
    },
    "reserve with ttl": {"v": 1, "op": "reserve", "id": "r", "wallet": "w", "amount": 5, "ttl_ms": 86_400_000},
    "reserve with usage": {
        "v": 1, "op": "reserve", "id": "r", "wallet": "w",
        "usage": {"model": "m", "input_tokens": 1, "output_tokens": 1},
    },
    "extend": {"v": 1, "op": "extend", "id": "e", "wallet": "w", "hold": "r", "amount": 1, "ttl_ms": 1},
    "capture of the whole hold": {"v": 1, "op": "capture", "id": "k", "wallet": "w", "hold": "r"},
    "capture of 0": {"v": 1, "op": "capture", "id": "k", "wallet": "w", "hold": "r", "amount": 0},
    "release": {"v": 1, "op": "release", "id": "x", "wallet": "w", "hold": "r"},
    "expire": {"v": 1, "op": "expire", "id": "expire:r", "wallet": "w", "hold": "r"},
    "expire of a hold with a 128-character id": {
        "v": 1, "op": "expire", "id": "expire:" + "r" * 128, "wallet": "w", "hold": "r" * 128,
    },
    "memo of 256 characters": {"v": 1, "op": "credit", "id": "c", "wallet": "w", "amount": 1, "memo": "€" * 256},
}

COMMANDS_INVALID = {
    "v missing": {"op": "open", "id": "o", "wallet": "w"},
    "v as a string": {"v": "1", "op": "open", "id": "o", "wallet": "w"},
    "wallet missing": {"v": 1, "op": "open", "id": "o"},
    "credit without amount": {"v": 1, "op": "credit", "id": "c", "wallet": "w"},
    "credit with usage": {
        "v": 1, "op": "credit", "id": "c", "wallet": "w", "amount": 1,
        "usage": {"model": "m", "input_tokens": 1, "output_tokens": 1},
    },
    "charge with neither amount nor usage": {"v": 1, "op": "charge", "id": "c", "wallet": "w"},
    "charge with both amount and usage": {
        "v": 1, "op": "charge", "id": "c", "wallet": "w", "amount": 1,
        "usage": {"model": "m", "input_tokens": 1, "output_tokens": 1},
    },
    "charge of 0": {"v": 1, "op": "charge", "id": "c", "wallet": "w", "amount": 0},
    "charge with ttl_ms": {"v": 1, "op": "charge", "id": "c", "wallet": "w", "amount": 1, "ttl_ms": 5},
    "usage with a negative count": {
        "v": 1, "op": "charge", "id": "c", "wallet": "w",
        "usage": {"model": "m", "input_tokens": -1, "output_tokens": 1},
    },
    "usage with an unknown field": {
        "v": 1, "op": "charge", "id": "c", "wallet": "w",
        "usage": {"model": "m", "input_tokens": 1, "output_tokens": 1, "cached_tokens": 1},
    },
    "usage with an empty model": {
        "v": 1, "op": "charge", "id": "c", "wallet": "w",
        "usage": {"model": "", "input_tokens": 1, "output_tokens": 1},
    },
    "reserve with floor": {"v": 1, "op": "reserve", "id": "r", "wallet": "w", "amount": 1, "floor": 0},
    "reserve with ttl_ms 0": {"v": 1, "op": "reserve", "id": "r", "wallet": "w", "amount": 1, "ttl_ms": 0},
    "reserve with ttl_ms over a day": {
        "v": 1, "op": "reserve", "id": "r", "wallet": "w", "amount": 1, "ttl_ms": 86_400_001,
    },
    "reserve with hold": {"v": 1, "op": "reserve", "id": "r", "wallet": "w", "amount": 1, "hold": "h"},
    "extend without amount": {"v": 1, "op": "extend", "id": "e", "wallet": "w", "hold": "r", "ttl_ms": 1},
    "extend without hold": {"v": 1, "op": "extend", "id": "e", "wallet": "w", "amount": 1},
    "capture with ttl_ms": {"v": 1, "op": "capture", "id": "k", "wallet": "w", "hold": "r", "ttl_ms": 1},
    "capture of a negative amount": {"v": 1, "op": "capture", "id": "k", "wallet": "w", "hold": "r", "amount": -1},
    "release with amount": {"v": 1, "op": "release", "id": "x", "wallet": "w", "hold": "r", "amount": 1},
    "release without hold": {"v": 1, "op": "release", "id": "x", "wallet": "w"},
    "expire with an ordinary id": {"v": 1, "op": "expire", "id": "r", "wallet": "w", "hold": "r"},
    "expire:… id on an open of 135 characters": {"v": 1, "op": "open", "id": "expire:" + "r" * 128, "wallet": "w"},
    "wallet of the expire form": {"v": 1, "op": "open", "id": "o", "wallet": "expire:" + "w" * 128},
    "hold with a bad id": {"v": 1, "op": "release", "id": "x", "wallet": "w", "hold": "bad hold"},
    "a fraction": {"v": 1, "op": "credit", "id": "c", "wallet": "w", "amount": 0.5},
    "open with a floor of 2^53": {"v": 1, "op": "open", "id": "o", "wallet": "w", "floor": -(2**53)},
}


@pytest.mark.parametrize("name", COMMANDS_VALID)
def test_sample_command_is_valid(name: str) -> None:
    assert errors("command", COMMANDS_VALID[name]) == []


@pytest.mark.parametrize("name", COMMANDS_INVALID)
def test_sample_command_is_invalid(name: str) -> None:
    assert errors("command", COMMANDS_INVALID[name]) != []


# ------------------------------------------------------------------- sample replies and events


def sample_reply(**overrides: Any) -> dict[str, Any]:
    reply = {
        "v": 1, "id": "charge-1", "wallet": "agent-7", "op": "charge", "ok": True, "status": 200,
        "error": None, "amount": 300, "balance": 700, "reserved": 0, "available": 700, "seq": 4,
        "at": SAMPLE_AT, "duplicate": False,
    }
    reply.update(overrides)
    return {key: value for key, value in reply.items() if value is not ABSENT}


ABSENT = object()
NO_WALLET = {"balance": ABSENT, "reserved": ABSENT, "available": ABSENT}
REFUSAL = {"ok": False, "amount": ABSENT}

REPLIES_VALID = {
    "accepted charge": sample_reply(),
    "accepted open": sample_reply(op="open", id="open-1", amount=ABSENT, balance=0, available=500, seq=1),
    "duplicate of an accepted charge": sample_reply(duplicate=True),
    "402": sample_reply(**REFUSAL, status=402, error="insufficient_funds", message="amount: 701 exceeds 700"),
    "409 wallet_exists": sample_reply(**REFUSAL, op="open", status=409, error="wallet_exists", message="wallet exists"),
    "409 balance_overflow": sample_reply(**REFUSAL, op="credit", status=409, error="balance_overflow", message="x"),
    "409 idempotency_conflict": sample_reply(
        **REFUSAL, status=409, error="idempotency_conflict", message="id names another request", seq=ABSENT
    ),
    "404 wallet_not_found": sample_reply(
        **REFUSAL, **NO_WALLET, status=404, error="wallet_not_found", message="wallet not found", seq=ABSENT
    ),
    "422 with everything echoed": sample_reply(
        **REFUSAL, **NO_WALLET, status=422, error="invalid_command", message="amount: not an integer", seq=ABSENT
    ),
    "422 with nothing echoed": sample_reply(
        **REFUSAL, **NO_WALLET, id=None, wallet=None, op=None, status=422, error="invalid_command",
        message="value: not JSON", seq=ABSENT,
    ),
    "422 unknown_model": sample_reply(
        **REFUSAL, **NO_WALLET, status=422, error="unknown_model", message="usage.model: no price", seq=ABSENT
    ),
    "accepted reserve": sample_reply(
        op="reserve", id="r-1", amount=50, reserved=50, available=650, hold="r-1", expires_at="2026-11-23T10:05:00.123Z"
    ),
    "accepted capture of 0": sample_reply(op="capture", id="k-1", amount=0),
    "accepted expire": sample_reply(op="expire", id="expire:r-1", amount=50),
    "410 on extend": sample_reply(**REFUSAL, op="extend", status=410, error="hold_expired", message="hold r-1 expired"),
    "409 hold_not_expired on expire": sample_reply(
        **REFUSAL, op="expire", id="expire:r-1", status=409, error="hold_not_expired", message="x", seq=ABSENT
    ),
    "401": sample_reply(**REFUSAL, **NO_WALLET, status=401, error="unauthenticated", message="no auth", seq=ABSENT),
}

REPLIES_INVALID = {
    "a float amount": sample_reply(amount=300.5),
    "ok missing": sample_reply(ok=ABSENT),
    "at missing": sample_reply(at=ABSENT),
    "at without milliseconds": sample_reply(at="2026-11-23T10:00:00Z"),
    "at with an offset": sample_reply(at="2026-11-23T11:00:00.123+01:00"),
    "v 2": sample_reply(v=2),
    "an unknown field": sample_reply(memo="m"),
    "a balance past 2^53-1": sample_reply(balance=2**53),
    "ok with status 402": sample_reply(status=402, error="insufficient_funds"),
    "ok with an error": sample_reply(error="insufficient_funds"),
    "ok with a message": sample_reply(message="fine"),
    "a refusal without a message": sample_reply(**REFUSAL, status=402, error="insufficient_funds"),
    "a refusal with an amount": sample_reply(ok=False, status=402, error="insufficient_funds", message="x"),
    "402 with the wrong code": sample_reply(**REFUSAL, status=402, error="wallet_exists", message="x"),
    "wallet_exists on a charge": sample_reply(**REFUSAL, status=409, error="wallet_exists", message="x"),
    "accepted charge without amount": sample_reply(amount=ABSENT),
    "accepted open with amount": sample_reply(op="open", amount=5),
    "accepted charge without balance": sample_reply(balance=ABSENT),
    "accepted charge without seq": sample_reply(seq=ABSENT),
    "a hold on a charge": sample_reply(hold="r-1"),
    "accepted reserve without expires_at": sample_reply(op="reserve", hold="r-1"),
    "422 with seq": sample_reply(**REFUSAL, **NO_WALLET, status=422, error="invalid_command", message="a: b"),
    "422 with balance": sample_reply(
        **REFUSAL, status=422, error="invalid_command", message="amount: b", seq=ABSENT
    ),
    "422 message without a field": sample_reply(
        **REFUSAL, **NO_WALLET, status=422, error="invalid_command", message="bad", seq=ABSENT
    ),
    "404 wallet_not_found with balance": sample_reply(
        **REFUSAL, status=404, error="wallet_not_found", message="x", seq=ABSENT
    ),
    "409 idempotency_conflict with seq": sample_reply(**REFUSAL, status=409, error="idempotency_conflict", message="x"),
    "null id on a 200": sample_reply(id=None),
    "null wallet on a 402": sample_reply(**REFUSAL, wallet=None, status=402, error="insufficient_funds", message="x"),
    "an unknown op": sample_reply(op="refund"),
    "an expire with an ordinary id": sample_reply(op="expire", id="r-1", amount=50),
    "a charge with an expire id of 135 characters": sample_reply(id="expire:" + "r" * 128),
    "duplicate without seq": sample_reply(**REFUSAL, status=409, error="idempotency_conflict", message="x",
                                          seq=ABSENT, duplicate=True),
    "a negative available": sample_reply(available=-1),
    "an accepted charge of 0": sample_reply(amount=0),
}


@pytest.mark.parametrize("name", REPLIES_VALID)
def test_sample_reply_is_valid(name: str) -> None:
    assert errors("reply", REPLIES_VALID[name]) == []


@pytest.mark.parametrize("name", REPLIES_INVALID)
def test_sample_reply_is_invalid(name: str) -> None:
    assert errors("reply", REPLIES_INVALID[name]) != []


def as_event(reply: dict[str, Any], partition: int = 3, offset: int = 41) -> dict[str, Any]:
    return {**reply, "partition": partition, "offset": offset}


EVENTS_VALID = {
    name: as_event(REPLIES_VALID[name])
    for name in ("accepted charge", "accepted open", "402", "409 wallet_exists", "409 balance_overflow",
                 "accepted reserve", "410 on extend")
}
EVENTS_INVALID = {
    "a duplicate": as_event(REPLIES_VALID["duplicate of an accepted charge"]),
    "a 422": as_event(REPLIES_VALID["422 with everything echoed"]),
    "an idempotency_conflict": as_event(REPLIES_VALID["409 idempotency_conflict"]),
    "a wallet_not_found": as_event(REPLIES_VALID["404 wallet_not_found"]),
    "a hold_not_expired": as_event(REPLIES_VALID["409 hold_not_expired on expire"]),
    "partition missing": REPLIES_VALID["accepted charge"],
    "a negative offset": as_event(REPLIES_VALID["accepted charge"], offset=-1),
    "a float partition": as_event(REPLIES_VALID["accepted charge"], partition=1.5),
    "an unknown field": {**as_event(REPLIES_VALID["accepted charge"]), "topic": "floorguard.commands"},
    "a float amount": as_event(REPLIES_INVALID["a float amount"]),
}


@pytest.mark.parametrize("name", EVENTS_VALID)
def test_sample_event_is_valid(name: str) -> None:
    assert errors("event", EVENTS_VALID[name]) == []


@pytest.mark.parametrize("name", EVENTS_INVALID)
def test_sample_event_is_invalid(name: str) -> None:
    assert errors("event", EVENTS_INVALID[name]) != []


def test_the_reply_schema_refuses_partition_and_offset() -> None:
    assert errors("reply", EVENTS_VALID["accepted charge"]) != []


# ------------------------------------------------------------------------------------- vectors


def vector_cases() -> list[tuple[str, dict[str, Any]]]:
    cases = []
    for path in VECTOR_FILES:
        for case in load_json(path)["cases"]:
            cases.append((path.name, case))
    return cases


VECTOR_CASES = vector_cases()
CASE_IDS = [f"{file}: {case['name']}" for file, case in VECTOR_CASES]


def test_the_vector_files_exist() -> None:
    names = {path.name for path in VECTOR_FILES}
    assert {"open_credit_charge.json", "malformed.json"} <= names


@pytest.mark.parametrize("path", VECTOR_FILES, ids=lambda path: path.name)
def test_vector_file_format(path: pathlib.Path) -> None:
    document = load_json(path)
    assert set(document) == {"description", "cases"}
    assert isinstance(document["description"], str) and document["description"]
    names = [case["name"] for case in document["cases"]]
    assert len(names) == len(set(names)), "case names are unique within a file"
    for case in document["cases"]:
        assert set(case) <= {"name", "record", "no_reply_to", "expect"}, case["name"]
        record = case["record"]
        assert set(record) <= {"key", "value", "value_text", "headers"}, case["name"]
        assert "key" in record and (record["key"] is None or isinstance(record["key"], str))
        assert ("value" in record) != ("value_text" in record), "exactly one of value and value_text"
        if "value_text" in record:
            assert isinstance(record["value_text"], str)
        for name, header in record.get("headers", {}).items():
            assert isinstance(name, str) and isinstance(header, str), case["name"]
        assert isinstance(case.get("no_reply_to", False), bool)
        expect = case["expect"]
        if "dlq" in expect:
            assert set(expect) == {"dlq"} and set(expect["dlq"]) == {"reason_contains"}
            # The runner's own reply_to would give the record a usable reply address.
            assert case.get("no_reply_to") is True, case["name"]
        else:
            assert set(expect) <= {"reply", "message_contains", "absent"}, case["name"]
            assert isinstance(expect["reply"], dict) and "status" in expect["reply"]
            assert not set(expect.get("absent", [])) & set(expect["reply"]), case["name"]
            if "reply_to" in record.get("headers", {}):
                assert case.get("no_reply_to") is True, "a case naming its own reply_to sets no_reply_to"


def record_value_bytes(record: dict[str, Any]) -> bytes:
    """The bytes a runner sends: compact UTF-8 JSON of `value`, or `value_text` as it is."""
    if "value_text" in record:
        return record["value_text"].encode("utf-8")
    return json.dumps(record["value"], separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def message_field(case: dict[str, Any]) -> str | None:
    contains = case["expect"].get("message_contains")
    if contains is None or ":" not in contains:
        return None
    return contains.split(":", 1)[0]


def detectable_from_value(case: dict[str, Any]) -> bool:
    """A 422 the command schema must refuse: the record carries a parsed `value` (raw-text faults
    such as 1e3 or a duplicate key are invisible once parsed) and the message names a field of
    the value, not the key, a header or the value's bytes."""
    field_name = message_field(case)
    return (
        "value" in case["record"]
        and case["expect"].get("reply", {}).get("status") == 422
        and field_name is not None
        and field_name.split(".")[0] not in NOT_VALUE_FIELDS
    )


def cases_where(predicate: Any) -> dict[str, Any]:
    return {
        "argvalues": [case for _, case in VECTOR_CASES if predicate(case)],
        "ids": [case_id for case_id, (_, case) in zip(CASE_IDS, VECTOR_CASES) if predicate(case)],
    }


def decided(case: dict[str, Any]) -> bool:
    return case["expect"].get("reply", {}).get("status") in DECIDED_STATUSES


def replied(case: dict[str, Any]) -> bool:
    return "reply" in case["expect"]


@pytest.mark.parametrize("case", **cases_where(decided))
def test_decided_vector_value_is_a_valid_command(case: dict[str, Any]) -> None:
    value_bytes = record_value_bytes(case["record"])
    assert len(value_bytes) <= VALUE_SIZE_MAX_BYTES
    assert errors("command", json.loads(value_bytes)) == []


@pytest.mark.parametrize("case", **cases_where(detectable_from_value))
def test_422_vector_detectable_from_the_value_is_an_invalid_command(case: dict[str, Any]) -> None:
    assert errors("command", case["record"]["value"]) != []


def test_many_422_vectors_are_checked_against_the_schema() -> None:
    assert len(cases_where(detectable_from_value)["argvalues"]) >= 20


@pytest.mark.parametrize("case", **cases_where(replied))
def test_expected_reply_completes_to_a_valid_reply(case: dict[str, Any]) -> None:
    """Fill in what a vector cannot know (`at`, a refusal's exact message) and the expected reply
    must be a valid reply; a stored decision's reply, with a partition and offset, a valid event."""
    reply = copy.deepcopy(case["expect"]["reply"])
    reply.setdefault("at", SAMPLE_AT)
    if reply["ok"] is False:
        reply.setdefault("message", case["expect"].get("message_contains", "") + " the problem")
    assert errors("reply", reply) == []
    if "seq" in reply and not reply["duplicate"]:
        assert errors("event", as_event(reply)) == []
    if reply["status"] == 422:
        assert case["expect"]["message_contains"].endswith(":") or ": " in case["expect"]["message_contains"]
        assert {"seq", "balance"} <= set(case["expect"]["absent"])


def test_malformed_cases_never_depend_on_ledger_state() -> None:
    for case in load_json(SCHEMAS / "vectors" / "malformed.json")["cases"]:
        expect = case["expect"]
        assert "dlq" in expect or expect["reply"]["status"] == 422, case["name"]


# --------------------------------------------- open_credit_charge.json replayed against a model


@dataclass
class ModelWallet:
    floor: int
    balance: int = 0
    seq: int = 0
    decisions: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)

    def state(self) -> dict[str, int]:
        return {"balance": self.balance, "reserved": 0, "available": self.balance - self.floor}


def fingerprint(value: dict[str, Any]) -> str:
    """D9: every field but memo, with defaults applied."""
    request = {key: item for key, item in value.items() if key != "memo"}
    if request["op"] == "open":
        request.setdefault("floor", 0)
    if request["op"] == "reserve":
        request.setdefault("ttl_ms", TTL_MS_DEFAULT)
    return json.dumps(request, sort_keys=True)


def model_decide(ledger: dict[str, ModelWallet], value: dict[str, Any]) -> dict[str, Any]:
    """The contract's open, credit and charge rules, written as plainly as possible."""
    op, wallet_id, command_id = value["op"], value["wallet"], value["id"]
    head = {"v": 1, "id": command_id, "wallet": wallet_id, "op": op, "duplicate": False}
    wallet = ledger.get(wallet_id)
    if wallet is None and op != "open":
        return {**head, "ok": False, "status": 404, "error": "wallet_not_found"}
    if wallet is not None and command_id in wallet.decisions:
        stored_fingerprint, stored = wallet.decisions[command_id]
        if stored_fingerprint == fingerprint(value):
            return {**stored, "duplicate": True}
        return {**head, "ok": False, "status": 409, "error": "idempotency_conflict", **wallet.state()}
    if wallet is None:
        wallet = ledger[wallet_id] = ModelWallet(floor=value.get("floor", 0))
        outcome: dict[str, Any] = {"ok": True, "status": 200, "error": None}
    elif op == "open":
        outcome = {"ok": False, "status": 409, "error": "wallet_exists"}
    elif op == "credit":
        amount = value["amount"]
        if wallet.balance + amount - wallet.floor > EXACT_INTEGER_MAX:
            outcome = {"ok": False, "status": 409, "error": "balance_overflow"}
        else:
            wallet.balance += amount
            outcome = {"ok": True, "status": 200, "error": None, "amount": amount}
    else:
        assert op == "charge"
        amount = value["amount"]
        if amount > wallet.state()["available"]:
            outcome = {"ok": False, "status": 402, "error": "insufficient_funds"}
        else:
            wallet.balance -= amount
            outcome = {"ok": True, "status": 200, "error": None, "amount": amount}
    wallet.seq += 1
    reply = {**head, **outcome, **wallet.state(), "seq": wallet.seq}
    wallet.decisions[command_id] = (fingerprint(value), reply)
    return reply


def test_open_credit_charge_agrees_with_a_model_of_the_contract() -> None:
    ledger: dict[str, ModelWallet] = {}
    for case in load_json(SCHEMAS / "vectors" / "open_credit_charge.json")["cases"]:
        record = case["record"]
        value = json.loads(record_value_bytes(record))
        assert record["key"] == value["wallet"], case["name"]
        reply = model_decide(ledger, value)
        for name, expected in case["expect"]["reply"].items():
            assert reply.get(name, ABSENT) == expected, f"{case['name']}: {name}"
        for name in case["expect"].get("absent", []):
            assert name not in reply, f"{case['name']}: {name} should be absent"
        assert set(reply) <= set(case["expect"]["reply"]), f"{case['name']}: expectation leaves out a field"


# ----------------------------------------------------------------------- docs/contract.md examples

JSON_BLOCK = re.compile(r"```json\n(.*?)```", re.DOTALL)


def contract_examples() -> list[Any]:
    return [json.loads(block) for block in JSON_BLOCK.findall(CONTRACT_DOC.read_text(encoding="utf-8"))]


def example_kind(example: dict[str, Any]) -> str:
    if "partition" in example:
        return "event"
    return "reply" if "ok" in example else "command"


def test_the_contract_document_has_examples_of_every_kind() -> None:
    kinds = {example_kind(example) for example in contract_examples()}
    assert kinds == set(KINDS)


@pytest.mark.parametrize("index", range(len(contract_examples())))
def test_contract_document_example_is_valid(index: int) -> None:
    example = contract_examples()[index]
    assert errors(example_kind(example), example) == []
