"""The decision core, hammered: exhaustive cases of the rules and properties over any history."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from worker.core.codes import SAFE_INTEGER_MAX
from worker.core.decide import decide_batch
from worker.core.model import Invalid, PartitionState, Record
from worker.core.parse import parse

REPLIES = (("reply_to", b"fg.replies"),)
FORBIDDEN = ("fg.commands", "fg.events", "fg.dlq")


def record(offset: int, value: dict | bytes, key: bytes | None = None, headers=REPLIES, at_ms: int = 0) -> Record:
    raw = value if isinstance(value, bytes) else json.dumps(value).encode()
    if key is None and isinstance(value, dict):
        key = str(value.get("wallet", "")).encode()
    return Record(0, offset, at_ms or 1_700_000_000_000 + offset, key, raw, headers)


def run(commands: list[dict], state: PartitionState | None = None):
    state = state or PartitionState(0, 0)
    parsed = [parse(record(i, c), FORBIDDEN) for i, c in enumerate(commands)]
    return state, decide_batch(state, parsed)


def test_charge_up_to_the_floor_and_not_one_unit_more():
    state, decisions = run([
        {"v": 1, "op": "open", "id": "o", "wallet": "w", "floor": -5},
        {"v": 1, "op": "credit", "id": "c", "wallet": "w", "amount": 10},
        {"v": 1, "op": "charge", "id": "a", "wallet": "w", "amount": 15},
        {"v": 1, "op": "charge", "id": "b", "wallet": "w", "amount": 1},
    ])  # fmt: skip
    assert [d.reply["status"] for d in decisions] == [200, 200, 200, 402]
    assert state.wallets["w"].balance == -5 and decisions[-1].reply["available"] == 0
    assert [d.reply["seq"] for d in decisions] == [1, 2, 3, 4]


def test_precedence_422_before_404_before_idempotency():
    _, decisions = run([
        {"v": 1, "op": "charge", "id": "x", "wallet": "nobody", "amount": 1.5},
        {"v": 1, "op": "charge", "id": "x", "wallet": "nobody", "amount": 1},
    ])  # fmt: skip
    assert decisions[0].reply["status"] == 422 and decisions[0].reply["message"].startswith("amount:")
    assert decisions[1].reply["error"] == "wallet_not_found" and "seq" not in decisions[1].reply


def test_duplicate_returns_the_stored_reply_even_after_a_top_up():
    _, decisions = run([
        {"v": 1, "op": "open", "id": "o", "wallet": "w"},
        {"v": 1, "op": "charge", "id": "a", "wallet": "w", "amount": 5},
        {"v": 1, "op": "credit", "id": "c", "wallet": "w", "amount": 10},
        {"v": 1, "op": "charge", "id": "a", "wallet": "w", "amount": 5, "memo": "again"},
        {"v": 1, "op": "charge", "id": "a", "wallet": "w", "amount": 6},
    ])  # fmt: skip
    first, duplicate, conflict = decisions[1].reply, decisions[3].reply, decisions[4].reply
    assert first["status"] == 402 and duplicate == {**first, "duplicate": True}
    assert not decisions[3].stored and conflict["error"] == "idempotency_conflict" and "seq" not in conflict


def test_credit_past_the_safe_range_is_refused_and_stored():
    _, decisions = run([
        {"v": 1, "op": "open", "id": "o", "wallet": "w", "floor": -10},
        {"v": 1, "op": "credit", "id": "c", "wallet": "w", "amount": SAFE_INTEGER_MAX - 10},
        {"v": 1, "op": "credit", "id": "d", "wallet": "w", "amount": 1},
    ])  # fmt: skip
    assert decisions[1].reply["available"] == SAFE_INTEGER_MAX
    assert decisions[2].reply["error"] == "balance_overflow" and decisions[2].stored


def test_time_never_runs_backwards_within_a_partition():
    state = PartitionState(0, 0)
    late = parse(record(0, {"v": 1, "op": "open", "id": "o", "wallet": "w"}, at_ms=5_000), FORBIDDEN)
    early = parse(record(1, {"v": 1, "op": "credit", "id": "c", "wallet": "w", "amount": 1}, at_ms=4_000), FORBIDDEN)
    decisions = decide_batch(state, [late, early])
    assert decisions[1].reply["at"] == "1970-01-01T00:00:05.000Z" and state.clock_ms == 5_000


def test_malformed_values_name_their_field():
    cases = {
        b'{"v":1,"op":"charge","id":"a","wallet":"w","amount":1e3}': "amount",
        b'{"v":1,"op":"charge","id":"a","wallet":"w","amount":true}': "amount",
        b'{"v":1,"op":"charge","id":"a","wallet":"w","amount":9007199254740992}': "amount",
        b'{"v":1,"op":"charge","id":"a","wallet":"w","amount":1,"amout":1}': "amout",
        b'{"v":1,"op":"charge","id":"a","wallet":"w","amount":1,"amount":2}': "value",
        b'{"v":1,"op":"charge","id":"a b","wallet":"w","amount":1}': "id",
        b'{"v":1,"op":"open","id":"a","wallet":"w","floor":1}': "floor",
        b'{"op":"open","id":"a","wallet":"w"}': "v",
        b'[1]': "value",
        b'\xff': "value",
    }
    for value, field in cases.items():
        parsed = parse(record(0, value, key=b"w"), FORBIDDEN)
        assert isinstance(parsed.command, Invalid) and parsed.command.field == field, (value, parsed.command)


def test_a_record_without_a_usable_reply_address_goes_to_the_dead_letter_topic():
    assert parse(record(0, b"nope", key=b"w", headers=()), FORBIDDEN).dead_letter_reason
    to_log = parse(record(0, {"v": 1, "op": "open", "id": "o", "wallet": "w"}, headers=(("reply_to", b"fg.commands"),)), FORBIDDEN)
    assert to_log.dead_letter_reason and to_log.command.field == "reply_to"
    fine = parse(record(0, {"v": 1, "op": "open", "id": "o", "wallet": "w"}, headers=()), FORBIDDEN)
    assert fine.dead_letter_reason is None and fine.reply_address is None


# --- properties over any history -----------------------------------------------------------

WALLETS = ("a", "b", "c")
IDS = tuple(f"id{i}" for i in range(12))
command_strategy = st.one_of(
    st.builds(lambda w, i, f: {"v": 1, "op": "open", "id": i, "wallet": w, "floor": f},
              st.sampled_from(WALLETS), st.sampled_from(IDS), st.integers(-1_000, 0)),
    st.builds(lambda w, i, a: {"v": 1, "op": "credit", "id": i, "wallet": w, "amount": a},
              st.sampled_from(WALLETS), st.sampled_from(IDS), st.integers(1, 2_000)),
    st.builds(lambda w, i, a: {"v": 1, "op": "charge", "id": i, "wallet": w, "amount": a},
              st.sampled_from(WALLETS), st.sampled_from(IDS), st.integers(1, 2_000)),
)  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(st.lists(command_strategy, max_size=60))
def test_any_history_keeps_the_invariant_the_books_and_the_sequence(commands):
    state, decisions = run(commands)
    for wallet in state.wallets.values():
        assert wallet.balance - wallet.reserved >= wallet.floor
    for name, wallet in state.wallets.items():
        stored = [d.reply for d in decisions if d.stored and d.reply["wallet"] == name]
        assert [r["seq"] for r in stored] == list(range(1, len(stored) + 1))
        credits = sum(r["amount"] for r in stored if r["ok"] and r["op"] == "credit")
        charges = sum(r["amount"] for r in stored if r["ok"] and r["op"] == "charge")
        assert wallet.balance == credits - charges
        assert wallet.seq == len(stored)


@settings(max_examples=200, deadline=None)
@given(st.lists(command_strategy, max_size=40), st.integers(1, 39))
def test_a_batch_split_anywhere_decides_the_same(commands, cut):
    """Batch size is a knob for speed, never for outcomes."""
    _, whole = run(commands)
    state, first = run(commands[:cut])
    parsed = [parse(record(i, c), FORBIDDEN) for i, c in enumerate(commands)][cut:]
    rest = decide_batch(state, parsed)
    assert [d.reply for d in whole] == [d.reply for d in first + rest]


# --- holds ----------------------------------------------------------------------------------

HOLD_IDS = ("h1", "h2", "h3")
hold_strategy = st.one_of(
    command_strategy,
    st.builds(lambda w, h, a, t: {"v": 1, "op": "reserve", "id": h, "wallet": w, "amount": a, "ttl_ms": t},
              st.sampled_from(WALLETS), st.sampled_from(HOLD_IDS), st.integers(1, 1_500), st.integers(1, 5_000)),
    st.builds(lambda w, h, i, a: {"v": 1, "op": "extend", "id": i, "wallet": w, "hold": h, "amount": a},
              st.sampled_from(WALLETS), st.sampled_from(HOLD_IDS), st.sampled_from(IDS), st.integers(1, 500)),
    st.builds(lambda w, h, i, a: {"v": 1, "op": "capture", "id": i, "wallet": w, "hold": h, **a},
              st.sampled_from(WALLETS), st.sampled_from(HOLD_IDS), st.sampled_from(IDS),
              st.one_of(st.just({}), st.builds(lambda n: {"amount": n}, st.integers(0, 2_000)))),
    st.builds(lambda w, h, i: {"v": 1, "op": "release", "id": i, "wallet": w, "hold": h},
              st.sampled_from(WALLETS), st.sampled_from(HOLD_IDS), st.sampled_from(IDS)),
    st.builds(lambda w, h: {"v": 1, "op": "expire", "id": f"expire:{h}", "wallet": w, "hold": h},
              st.sampled_from(WALLETS), st.sampled_from(HOLD_IDS)),
)  # fmt: skip


@settings(max_examples=500, deadline=None)
@given(st.lists(st.tuples(hold_strategy, st.integers(0, 2_000)), max_size=60))
def test_holds_keep_the_invariant_and_reserved_is_the_sum_of_open_holds(steps):
    state = PartitionState(0, 0)
    at_ms, parsed = 1_000, []
    for i, (command, step_ms) in enumerate(steps):
        at_ms += step_ms  # time moves on between commands, so holds expire along the way
        parsed.append(parse(record(i, command, at_ms=at_ms), FORBIDDEN))
    decisions = decide_batch(state, parsed)
    for name, wallet in state.wallets.items():
        assert wallet.balance - wallet.reserved >= wallet.floor
        open_holds = sum(h.amount for (w, _), h in state.holds.items() if w == name and h.open)
        assert wallet.reserved == open_holds
        stored = [d.reply for d in decisions if d.stored and d.reply["wallet"] == name]
        assert [r["seq"] for r in stored] == list(range(1, len(stored) + 1))
        moved_in = sum(r["amount"] for r in stored if r["ok"] and r["op"] == "credit")
        moved_out = sum(r["amount"] for r in stored if r["ok"] and r["op"] in ("charge", "capture"))
        assert wallet.balance == moved_in - moved_out
        closings = [r["id"] for r in stored if r["ok"] and r["op"] in ("capture", "release", "expire")]
        closed = [d.parsed.command.hold for d in decisions if d.stored and d.reply["ok"] and d.reply["wallet"] == name
                  and d.reply["op"] in ("capture", "release", "expire")]  # fmt: skip
        assert len(closed) == len(set(closed)) == len(closings), "a hold closed twice"


def test_capture_and_extend_after_expiry_are_410_before_any_expire_arrives():
    state = PartitionState(0, 0)
    commands = [
        ({"v": 1, "op": "open", "id": "o", "wallet": "w"}, 1_000),
        ({"v": 1, "op": "credit", "id": "c", "wallet": "w", "amount": 100}, 1_000),
        ({"v": 1, "op": "reserve", "id": "h", "wallet": "w", "amount": 60, "ttl_ms": 500}, 1_000),
        ({"v": 1, "op": "expire", "id": "expire:h", "wallet": "w", "hold": "h"}, 1_499),
        ({"v": 1, "op": "capture", "id": "cap", "wallet": "w", "hold": "h", "amount": 10}, 1_500),
        ({"v": 1, "op": "extend", "id": "ext", "wallet": "w", "hold": "h", "amount": 1}, 1_500),
        ({"v": 1, "op": "expire", "id": "expire:h", "wallet": "w", "hold": "h"}, 1_500),
        ({"v": 1, "op": "release", "id": "rel", "wallet": "w", "hold": "h"}, 1_500),
    ]
    decisions = decide_batch(state, [parse(record(i, c, at_ms=t), FORBIDDEN) for i, (c, t) in enumerate(commands)])
    replies = [d.reply for d in decisions]
    assert replies[2]["available"] == 40 and replies[2]["expires_at"] == "1970-01-01T00:00:01.500Z"
    assert replies[3]["error"] == "hold_not_expired" and not decisions[3].stored  # may come again
    assert [r["status"] for r in replies[4:6]] == [410, 410] and decisions[4].stored
    assert replies[6]["ok"] and replies[6]["amount"] == 60 and replies[6]["available"] == 100
    assert replies[7]["error"] == "hold_closed"


def test_partial_capture_releases_the_rest_and_more_than_the_hold_is_refused():
    _, decisions = run([
        {"v": 1, "op": "open", "id": "o", "wallet": "w"},
        {"v": 1, "op": "credit", "id": "c", "wallet": "w", "amount": 100},
        {"v": 1, "op": "reserve", "id": "h", "wallet": "w", "amount": 50},
        {"v": 1, "op": "capture", "id": "x", "wallet": "w", "hold": "h", "amount": 51},
        {"v": 1, "op": "capture", "id": "y", "wallet": "w", "hold": "h", "amount": 20},
    ])  # fmt: skip
    assert decisions[3].reply["error"] == "exceeds_hold"
    assert decisions[4].reply["balance"] == 80 and decisions[4].reply["reserved"] == 0


def test_usage_is_priced_by_the_row_in_force_rounded_up():
    from worker.core.model import Price

    state = PartitionState(0, 0, prices={"m": [Price("m", 0, 3, 15), Price("m", 10_000, 6, 30)]})
    usage = {"model": "m", "input_tokens": 1_000, "output_tokens": 7}
    commands = [
        ({"v": 1, "op": "open", "id": "o", "wallet": "w"}, 1_000),
        ({"v": 1, "op": "credit", "id": "c", "wallet": "w", "amount": 100}, 1_000),
        ({"v": 1, "op": "charge", "id": "a", "wallet": "w", "usage": usage}, 9_999),
        ({"v": 1, "op": "charge", "id": "b", "wallet": "w", "usage": usage}, 10_000),
        ({"v": 1, "op": "charge", "id": "d", "wallet": "w", "usage": {**usage, "model": "other"}}, 10_000),
    ]
    decisions = decide_batch(state, [parse(record(i, c, at_ms=t), FORBIDDEN) for i, (c, t) in enumerate(commands)])
    assert decisions[2].reply["amount"] == 1  # ceil((3,000 + 105) / 1e6)
    assert decisions[3].reply["amount"] == 1
    assert decisions[4].reply["status"] == 422 and decisions[4].reply["error"] == "unknown_model"
    assert not decisions[4].stored
