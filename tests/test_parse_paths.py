"""The fast path of `parse` answers exactly what the thorough one would, on every record; so does
the compiled one (native/, `worker/core/native.py`).

`parse` takes a well-formed command by a typed msgspec decode and hands anything unusual to
`parse_thorough`; if the fast path ever accepted a record the thorough one refuses, or read it
differently, a command would be decided that the contract refuses. These tests drive both paths
with the fuzzer's grammar (valid commands of every op, and each broken by one mutation) and with
arbitrary bytes, and require equal results. Pure: no service is needed.
"""

from __future__ import annotations

import json
import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzzing import HypothesisChooser, RandomChooser, broken_record, fuzz_record, valid_draft
from tests.test_fuzz import FORBIDDEN, WORLD, headers_strategy, json_objects, record_of
from worker.core.codes import Op
from worker.core.model import Command, Record, Usage
from worker.core.native import COMPILED
from worker.core.parse import _well_formed, parse, parse_thorough
from worker.core.placement import partition_of

RECORDS_PER_RUN = 20_000


def _valid(chooser) -> Record:
    draft = valid_draft(chooser, WORLD)
    return Record(0, 0, 0, draft.key, draft.record_value(), tuple((n, v or b"") for n, v in draft.headers))


def test_every_valid_command_parses_the_same_both_ways_and_most_take_the_fast_path():
    chooser = RandomChooser(seed := random.randrange(2**32))
    fast = 0
    for n in range(RECORDS_PER_RUN):
        record = _valid(chooser)
        thorough = parse_thorough(record, FORBIDDEN)
        assert isinstance(thorough.command, Command), (seed, n, record, thorough)
        assert parse(record, FORBIDDEN) == thorough, (seed, n, record)
        fast += _well_formed(record, FORBIDDEN, None) is not None
    # The grammar adds memos with escapes, reply_partition headers and the like, which the thorough
    # path takes; plain commands, which are what agents send, must nearly all go the fast way.
    assert fast > RECORDS_PER_RUN // 3, fast


def test_every_broken_record_parses_the_same_both_ways():
    chooser = RandomChooser(seed := random.randrange(2**32))
    for n in range(RECORDS_PER_RUN):
        case = fuzz_record(chooser, WORLD)
        record = record_of(case, correlation_id=f"c-{n}" if case.correlated else None)
        thorough = parse_thorough(record, FORBIDDEN)
        assert parse(record, FORBIDDEN) == thorough == COMPILED.parse(record, FORBIDDEN, None), (seed, n, case)


@settings(max_examples=1_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_hypothesis_finds_no_record_the_two_paths_read_apart(data):
    chooser = HypothesisChooser(data)
    if data.draw(st.booleans()):
        record = _valid(chooser)
    else:
        record = record_of(broken_record(chooser, WORLD), correlation_id="c-1")
    assert parse(record, FORBIDDEN) == parse_thorough(record, FORBIDDEN) == COMPILED.parse(record, FORBIDDEN, None)


@settings(max_examples=2_000, deadline=None)
@given(st.one_of(st.none(), st.binary(max_size=16), st.just(b"w")),
       st.one_of(st.none(), st.binary(max_size=64), json_objects), headers_strategy)  # fmt: skip
def test_arbitrary_bytes_parse_the_same_both_ways(key, value, headers):
    record = Record(0, 0, 0, key, value, tuple(headers))
    assert parse(record, FORBIDDEN) == parse_thorough(record, FORBIDDEN) == COMPILED.parse(record, FORBIDDEN, None)


def test_a_key_given_twice_is_refused_by_both_paths():
    """msgspec keeps the last of a repeated key; the fast path counts the value's strings to notice."""
    for value in (b'{"v":1,"op":"charge","id":"a","wallet":"w","amount":5,"amount":7}',
                  b'{"v":1,"op":"charge","id":"a","wallet":"w","wallet":"w","amount":5}',
                  b'{"v":1,"op":"charge","id":"a","wallet":"w","amount":5,"memo":"x","memo":"y"}'):  # fmt: skip
        record = Record(0, 0, 0, b"w", value, (("reply_to", b"fz.replies"),))
        parsed = parse(record, FORBIDDEN)
        assert not isinstance(parsed.command, Command) and "duplicate key" in parsed.command.message, parsed


@settings(max_examples=3_000, deadline=None)
@given(st.sampled_from(list(Op)), st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,20}", fullmatch=True),
       st.one_of(st.none(), st.integers(0, 2**53 - 1)), st.one_of(st.none(), st.integers(-(2**53) + 1, 0)),
       st.one_of(st.none(), st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,20}", fullmatch=True)),
       st.one_of(st.none(), st.integers(1, 86_400_000)),
       st.one_of(st.none(), st.builds(Usage, st.text(min_size=1, max_size=12), st.integers(0, 2**53 - 1),
                                      st.integers(0, 2**53 - 1))))  # fmt: skip
def test_the_fingerprint_written_by_hand_is_the_canonical_one(op, wallet, amount, floor, hold, ttl_ms, usage):
    command = Command(op, "expire:h" if op is Op.EXPIRE else "id-1", wallet, amount, usage, floor, hold, ttl_ms)
    assert command.fingerprint() == command.canonical_fingerprint()
    canonical = json.dumps(command.request(), sort_keys=True, separators=(",", ":"))
    assert canonical.isascii()


def test_a_record_off_its_keys_partition_is_a_422_both_ways():
    """D33: a record must sit on the partition Kafka's default partitioner picks for its key, so
    that one writer decides each wallet; a producer that chose another partition by hand gets a 422."""
    value = b'{"v":1,"op":"charge","id":"c1","wallet":"w-7","amount":5}'
    home = partition_of(b"w-7", 8)
    for partition in range(8):
        record = Record(partition, 0, 0, b"w-7", value, (("reply_to", b"fz.replies"),))
        parsed = parse(record, FORBIDDEN, 8)
        assert parsed == parse_thorough(record, FORBIDDEN, 8)
        if partition == home:
            assert isinstance(parsed.command, Command), parsed
        else:
            assert parsed.command.message == (f"key: the record is on partition {partition}; Kafka's default "
                                              f"partitioner (murmur2) places this key on partition {home}")  # fmt: skip


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), st.integers(0, 7))
def test_placement_is_checked_the_same_both_ways(data, partition):
    record = _valid(HypothesisChooser(data))
    record = Record(partition, record.offset, record.timestamp_ms, record.key, record.value, record.headers)
    assert parse(record, FORBIDDEN, 8) == parse_thorough(record, FORBIDDEN, 8)
