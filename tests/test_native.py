"""The compiled hot path (native/) answers exactly what the Python core would, on every record.

The worker parses and decides with the compiled path; the Python core is the definition, and
decides whatever the compiled path hands it. If the two ever read a record differently, or left a
different state behind, a command would be decided against the contract. These tests drive both
with the fuzzer's grammar (broken records and arbitrary bytes: tests/test_parse_paths.py, beside
the Python core's own two paths) and random histories (every op, holds that expire,
duplicates and conflicts, 404s, priced usage, required signatures, balances at the safe range's
edge), and require equal `Parsed`s, equal decisions and equal states. They also require that the
common records are in fact decided compiled, so that a compiled path that handed everything to the
Python core could not pass for one. Pure: no service is needed. The extension must be installed
(`make` builds it): these tests fail, never skip, without it.
"""

from __future__ import annotations

import copy
import json
import random

import floorguard_native

from tests.fuzzing import RandomChooser, valid_draft
from tests.test_fuzz import FORBIDDEN, WORLD
from worker.core import native
from worker.core.auth import Authority
from worker.core.codes import SAFE_INTEGER_MAX
from worker.core.decide import decide, format_time
from worker.core.model import (
    Parsed,
    PartitionState,
    Price,
    Record,
    Wallet,
)
from worker.core.parse import parse
from worker.core.placement import partition_of

RECORDS_PER_RUN = 20_000
COMPILED = native.COMPILED
PYTHON = native.PYTHON


def test_the_compiled_path_is_installed_and_the_default():
    assert COMPILED is not None, f"floorguard_native is not installed: {native.MISSING}"
    assert native.hot_path() is COMPILED and native.hot_path(False) is PYTHON


# --- parse ----------------------------------------------------------------------------------


def _valid(chooser, partitions: int | None = None) -> Record:
    draft = valid_draft(chooser, WORLD)
    headers = [(n, v or b"") for n, v in draft.headers]
    if chooser.one_in(6):  # a signature, well formed or not
        signature = chooser.pick(["k1." + "ab" * 32, "k1.xyz", "", "k-2." + "0" * 64])
        headers.insert(chooser.integer(0, len(headers)), ("auth", signature.encode()))
    partition = partition_of(draft.key, partitions) if partitions and draft.key and chooser.integer(0, 9) else 0
    return Record(partition, 0, 0, draft.key, draft.record_value(), tuple(headers))


def test_every_valid_command_parses_the_same_both_ways_and_most_compiled():
    chooser = RandomChooser(seed := random.randrange(2**32))
    compiled = 0
    for n in range(RECORDS_PER_RUN):
        partitions = 8 if n % 2 else None
        record = _valid(chooser, partitions)
        assert COMPILED.parse(record, FORBIDDEN, partitions) == parse(record, FORBIDDEN, partitions), (seed, n, record)
        compiled += COMPILED_CORE.well_formed(record, FORBIDDEN, partitions) is not None
    # The grammar adds memos with escapes, reply_partition headers, models that are not ASCII and
    # the like, which the Python core reads; plain commands must nearly all be read compiled.
    assert compiled > RECORDS_PER_RUN // 4, compiled


def test_values_the_python_fast_path_reads_by_counting_strings():
    """A repeated key, a null, a missing v, whitespace, an exponent, a leading zero, a huge number."""
    for value in (b'{"v":1,"op":"charge","id":"a","wallet":"w","amount":5,"amount":7}',
                  b'{"v":1,"op":"charge","id":"a","wallet":"w","amount":5,"memo":null}',
                  b'{"op":"charge","id":"a","wallet":"w","amount":5}',
                  b' {\n"v" : 1 ,\t"op":"charge","id":"a","wallet":"w","amount":5}\r\n',
                  b'{"v":1,"op":"charge","id":"a","wallet":"w","amount":5e2}',
                  b'{"v":1,"op":"charge","id":"a","wallet":"w","amount":05}',
                  b'{"v":1,"op":"charge","id":"a","wallet":"w","amount":-0}',
                  b'{"v":1,"op":"capture","id":"a","wallet":"w","hold":"h","amount":-0}',
                  b'{"v":1,"op":"charge","id":"a","wallet":"w","amount":123456789012345678901234}',
                  b'{"v":1,"op":"charge","id":"a","wallet":"w","amount":9007199254740992}',
                  b'{"v":1,"op":"charge","id":"a","wallet":"w","amount":9007199254740991}',
                  b'{"v":1,"op":"charge","id":"a","wallet":"w","amount":5} x',
                  b'{"v":1,"op":"charge","id":"a","wallet":"w","usage":{"model":"m","input_tokens":1,"output_tokens":2}}',
                  b'{"v":1,"op":"charge","id":"a","wallet":"w","usage":{"model":"m","input_tokens":1}}',
                  b'{"v":1,"op":"charge","id":"a","wallet":"w","amount":5,"memo":"caf\xc3\xa9"}',
                  b'{"v":1,"op":"charge","id":"a","wallet":"w","amount":5,"memo":"\xff"}',
                  b'{"v":1,"op":"expire","id":"expire:h","wallet":"w","hold":"h"}',
                  b'{"v":1,"op":"expire","id":"expire:g","wallet":"w","hold":"h"}',
                  b'{"v":1,"op":"charge","id":"expire:h","wallet":"w","amount":5}',
                  b'{}', b'[]', b'', b'{"v":1}'):  # fmt: skip
        for headers in ((("reply_to", b"fz.replies"),), (("reply_to", b"fz.replies"), ("correlation_id", b"\xff")),
                        (("reply_to", b"fg.events"),), (("reply_to", b".."),), ()):  # fmt: skip
            record = Record(0, 0, 0, b"w", value, headers)
            assert COMPILED.parse(record, FORBIDDEN, None) == parse(record, FORBIDDEN), (value, headers)


def test_placement_and_time_agree_with_the_python_core():
    rng = random.Random(seed := random.randrange(2**32))
    for _ in range(20_000):
        key = rng.randbytes(rng.randrange(0, 40))
        partitions = rng.randrange(1, 64)
        assert floorguard_native.Core.partition_of(key, partitions) == partition_of(key, partitions), (seed, key)
        at_ms = rng.choice([rng.randrange(0, 253_402_300_800_000), rng.randrange(1_600_000_000_000, 1_900_000_000_000)])
        assert floorguard_native.Core.format_time(at_ms) == format_time(at_ms), (seed, at_ms)


# --- decide ---------------------------------------------------------------------------------

WALLETS = ("a", "b", "c", "d")
HOLDS = ("h1", "h2", "h3")
MODEL = "m1"


def _command(rng: random.Random, n: int, ids: list[str]) -> dict | bytes:
    """One command of a random history: mostly well formed, some not, some sent again."""
    wallet = rng.choice(WALLETS)
    if ids and rng.random() < 0.08:  # an id used before: a duplicate or a conflict, on any wallet
        return {"v": 1, "op": "charge", "id": rng.choice(ids), "wallet": wallet, "amount": rng.randint(1, 3)}
    command_id = f"i{n}"
    ids.append(command_id)
    big = rng.random() < 0.05  # amounts at the safe range's edge
    amount = rng.randint(SAFE_INTEGER_MAX - 10, SAFE_INTEGER_MAX) if big else rng.randint(1, 1_500)
    op = rng.choice(["open", "open", "credit", "credit", "charge", "charge", "charge", "reserve", "reserve", "extend",
                     "capture", "release", "expire", "usage", "broken", "nobody"])  # fmt: skip
    hold = rng.choice(HOLDS + tuple(ids[-5:]))
    if op == "open":
        floor = rng.choice([None, 0, -rng.randint(1, 2_000), -SAFE_INTEGER_MAX])
        return {"v": 1, "op": "open", "id": command_id, "wallet": wallet, **({} if floor is None else {"floor": floor})}
    if op in ("credit", "charge"):
        return {"v": 1, "op": op, "id": command_id, "wallet": wallet, "amount": amount,
                **({"memo": "m"} if rng.random() < 0.1 else {})}  # fmt: skip
    if op == "reserve":
        ttl = {} if rng.random() < 0.3 else {"ttl_ms": rng.randint(1, 4_000)}
        return {"v": 1, "op": "reserve", "id": rng.choice(HOLDS) if rng.random() < 0.5 else command_id,
                "wallet": wallet, "amount": amount, **ttl}  # fmt: skip
    if op == "extend":
        ttl = {} if rng.random() < 0.5 else {"ttl_ms": rng.randint(1, 4_000)}
        return {"v": 1, "op": "extend", "id": command_id, "wallet": wallet, "hold": hold, "amount": amount, **ttl}
    if op == "capture":
        some = {} if rng.random() < 0.4 else {"amount": rng.randint(0, 1_600)}
        return {"v": 1, "op": "capture", "id": command_id, "wallet": wallet, "hold": hold, **some}
    if op == "release":
        return {"v": 1, "op": "release", "id": command_id, "wallet": wallet, "hold": hold}
    if op == "expire":
        return {"v": 1, "op": "expire", "id": f"expire:{hold}", "wallet": wallet, "hold": hold}
    if op == "usage":
        return {"v": 1, "op": "charge", "id": command_id, "wallet": wallet,
                "usage": {"model": rng.choice([MODEL, "unpriced"]), "input_tokens": rng.randint(0, 10_000),
                          "output_tokens": rng.randint(0, 10_000)}}  # fmt: skip
    if op == "nobody":
        return {"v": 1, "op": "charge", "id": command_id, "wallet": "nobody", "amount": 1}
    return b'{"v":1,"op":"charge","id":"' + command_id.encode() + b'","wallet":"a","amount":1.5}'


def _history(seed: int, length: int) -> list[Parsed]:
    rng = random.Random(seed)
    ids: list[str] = []
    at_ms, parsed = 1_700_000_000_000, []
    for n in range(length):
        at_ms += rng.choice([0, 0, 1, 7, 250, 1_500, -300])  # time stands, moves, and now and then goes back
        command = _command(rng, n, ids)
        value = command if isinstance(command, bytes) else json.dumps(command).encode()
        wallet = b"a" if isinstance(command, bytes) else command["wallet"].encode()
        headers = (("reply_to", b"fz.replies"), ("correlation_id", b"c%d" % n))
        parsed.append(parse(Record(0, n, at_ms, wallet, value, headers), FORBIDDEN))
    return parsed


def _state(authority: Authority | None = None) -> PartitionState:
    prices = {MODEL: [Price(MODEL, 0, 3_000, 15_000), Price(MODEL, 1_700_000_300_000, 2_000, 10_000)]}
    return PartitionState(3, 0, prices=prices, authority=authority)


def _counting_core(counted: list[int]):
    """A compiled core whose calls into the Python core's `decide` are counted."""

    def counting_decide(state, parsed, at_ms):
        counted.append(1)
        return decide(state, parsed, at_ms)

    return floorguard_native.Core({**native.PARTS, "decide": counting_decide})


COMPILED_CORE = floorguard_native.Core(native.PARTS)  # for its `well_formed`, the compiled parse alone


def _decide_both(batches: list[list[Parsed]], authority: Authority | None = None) -> tuple[int, int]:
    """Decides the batches both ways, from equal states; returns (records, handed to Python)."""
    counted: list[int] = []
    core = _counting_core(counted)
    python_state, compiled_state = _state(authority), _state(authority)
    records = 0
    for batch in batches:
        expected = PYTHON.decide_batch(python_state, batch)
        got = core.decide_batch(compiled_state, batch)
        assert got == expected
        assert compiled_state == python_state
        assert list(compiled_state.decisions) == list(python_state.decisions)  # the same order, too
        records += len(batch)
    return records, len(counted)


def test_random_histories_decide_the_same_both_ways_and_mostly_compiled():
    handed = records = 0
    for seed in range(base := random.randrange(2**32), base + 40):
        history = _history(seed, 400)
        rng = random.Random(seed)
        batches, at = [], 0
        while at < len(history):  # batches of any size, as the worker's fetches make them
            size = rng.choice([1, 2, 5, 50, 400])
            batches.append(history[at:at + size])
            at += size
        done, python = _decide_both(batches)
        records, handed = records + done, handed + python
    # Refusals with no seq (422, 404, 409 on an id, unknown models), usage and expiries not yet due
    # are the Python core's; the rest, most of a history, must be decided compiled.
    assert handed < records * 0.45, (handed, records)


def test_a_partition_that_requires_signatures_is_decided_by_the_python_core_alone():
    authority = Authority(((0, False), (1_700_000_010_000, True)), {}, None)
    history = _history(random.randrange(2**32), 300)
    _records, python = _decide_both([history[:150], history[150:]], authority)
    required = sum(1 for p in history if p.record.timestamp_ms >= 1_700_000_010_000)
    assert python >= required


def test_a_state_carried_with_decisions_loaded_from_the_database_decides_the_same():
    """Wallets, holds and earlier decisions as `Store.load` fills them in, not as a batch made them."""
    history = _history(seed := random.randrange(2**32), 600)
    python_state = _state()
    PYTHON.decide_batch(python_state, history[:300])
    for keep in (True, False):
        left_python, left_compiled = copy.deepcopy(python_state), copy.deepcopy(python_state)
        if not keep:  # decisions not carried: only what the database would return for the batch's ids
            left_python.decisions, left_compiled.decisions = {}, {}
        expected = PYTHON.decide_batch(left_python, history[300:])
        assert COMPILED.decide_batch(left_compiled, history[300:]) == expected, seed
        assert left_compiled == left_python, seed


def test_a_broken_invariant_stops_the_compiled_path_as_it_stops_the_python_core():
    state = _state()
    state.wallets["a"] = Wallet("a", 10, 20, 0, 1, 3)  # reserved past the balance: no decision may leave it so
    record = Record(3, 0, 1_700_000_000_000, b"a", b'{"v":1,"op":"credit","id":"x","wallet":"a","amount":5}',
                    (("reply_to", b"fz.replies"),))  # fmt: skip
    parsed = parse(record, FORBIDDEN)
    for path in (PYTHON, COMPILED):
        try:
            path.decide_batch(copy.deepcopy(state), [parsed])
        except AssertionError:
            continue
        raise AssertionError(f"{path} decided past the invariant")


def test_the_safe_range_edge_is_refused_the_same_both_ways():
    at = 1_700_000_000_000
    values = [b'{"v":1,"op":"open","id":"o","wallet":"a","floor":-9007199254740991}',
              b'{"v":1,"op":"credit","id":"c1","wallet":"a","amount":9007199254740991}',
              b'{"v":1,"op":"credit","id":"c2","wallet":"a","amount":1}',
              b'{"v":1,"op":"reserve","id":"h","wallet":"a","amount":9007199254740991}',
              b'{"v":1,"op":"charge","id":"c3","wallet":"a","amount":9007199254740991}',
              b'{"v":1,"op":"reserve","id":"h2","wallet":"a","amount":1}']  # fmt: skip
    batch = [parse(Record(0, n, at, b"a", value, (("reply_to", b"fz.replies"),)), FORBIDDEN)
             for n, value in enumerate(values)]  # fmt: skip
    _records, python = _decide_both([batch])
    assert python == 0



# --- the rows of a batch --------------------------------------------------------------------


def test_the_decision_rows_of_random_histories_are_the_same_both_ways():
    from worker.core.outgoing import rendered
    from worker.store.rows import decision_columns

    for seed in range(base := random.randrange(2**32), base + 10):
        decisions = PYTHON.decide_batch(_state(), _history(seed, 300))
        stored = [(d, rendered(d, "fz.events", "fz.dlq", "fz.commands")[0]) for d in decisions if d.stored]
        args = ([d for d, _ in stored], [encoded for _, encoded in stored])
        assert native.COMPILED_COLUMNS(*args) == decision_columns(*args), seed
    assert native.COMPILED_COLUMNS([], []) == decision_columns([], [])


def test_a_core_type_whose_fields_changed_stops_the_compiled_path_at_its_start():
    """It makes the core's types positionally: a field added or moved must be taught to it first."""
    from msgspec import Struct

    class Command(Struct):
        op: str
        id: str
        wallet: str
        amount: int | None = None
        usage: object = None
        floor: int | None = None
        hold: str | None = None
        ttl_ms: int | None = None
        memo: str | None = None
        v: int = 1
        tags: dict | None = None

    try:
        floorguard_native.Core({**native.PARTS, "Command": Command})
    except TypeError as error:
        assert "Command" in str(error) and "tags" in str(error)
    else:
        raise AssertionError("the compiled path started on a Command it does not know")
