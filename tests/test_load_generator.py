"""The load generator (`loadtest/load.py`, its offer in Go: `loadtest/gen`) against the real worker.

`make bench` measures with it, so a generator that misplaces records, drops holds or loses
replies would make every figure wrong: a short run checks that it offers its whole mix, that
every send is answered, and that the ledger's guarantees hold.
"""

from __future__ import annotations

import pytest

from loadtest import load

pytestmark = pytest.mark.slow

RATE = 400
SECONDS = 3


async def test_the_generator_offers_its_mix_and_every_send_is_answered(tmp_path) -> None:
    result = await load.main(load.arguments([
        "--rate", str(RATE), "--seconds", str(SECONDS), "--distribution", "uniform", "--wallets", "300",
        "--hold-share", "0.2", "--retry-share", "0.1", "--logs", str(tmp_path),
    ]))  # fmt: skip

    assert result["checks"]["ok"], result["checks"]
    assert result["sent"] >= 0.9 * RATE * SECONDS, result
    # The holds' captures and releases, sent once their reserves are answered, are answered too.
    assert result["answered"] > result["sent"], result
    # Every record is on the partition Kafka's default partitioner (murmur2) gives its key: the
    # worker answers one placed anywhere else with a 422 (D33).
    assert set(result["statuses"]) <= {"200", "402"} and result["statuses"]["200"] > 0, result["statuses"]
    assert result["generator_cpu_us_per_command"] > 0


async def test_an_eager_offer_says_where_each_reply_s_time_went(tmp_path) -> None:
    result = await load.main(load.arguments([
        "--rate", str(RATE), "--seconds", str(SECONDS), "--distribution", "uniform", "--wallets", "300",
        "--eager", "--logs", str(tmp_path),
    ]))  # fmt: skip

    assert result["checks"]["ok"], result["checks"]
    assert result["eager"] and result["answered"] >= result["sent"] > 0, result
    # Each stage is a share of a reply's whole time: sent, acknowledged, reply produced, reply read.
    stages = result["stages_ms"]
    assert set(stages) == {"command_acknowledged", "reply_produced", "reply_read"}, stages
    for stage in stages.values():
        assert 0 <= stage["p50"] <= stage["p99"] <= result["latency_ms"]["max"] + 1, (stages, result["latency_ms"])
