"""The worker's per-command Python cost, step by step, without the broker or the database.

    .venv/bin/python loadtest/hotpath.py [--commands 50000] [--wallets 10000]

Feeds aiokafka `ConsumerRecord`s (charges with a reply address, as the worker fetches them) through
the same functions the worker runs per batch: from a fetched record to a parsed command, the
decisions of a partition's batch, the records to publish, and the columns the batch's statements
take. Prints microseconds per command for each step (best of five rounds): through the Python
core (`us_per_command`, the machine's Python speed that `make bench` records), and with parse,
decide and the decision rows compiled (`compiled_us_per_command`, as the worker runs them when
native/ is installed). The
database round trips and the produce calls are measured end to end by `loadtest/drain.py`, not here.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

from aiokafka.structs import ConsumerRecord

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker.adapter.fetch_guard import as_record  # noqa: E402
from worker.core.model import PartitionState, Wallet  # noqa: E402
from worker.core.native import COMPILED, COMPILED_COLUMNS, PYTHON, HotPath  # noqa: E402
from worker.core.outgoing import rendered  # noqa: E402
from worker.store.rows import decision_columns, encode_records  # noqa: E402

ROUNDS = 5
FORBIDDEN = ("fg.commands", "fg.events", "fg.dlq")


def records(count: int, wallets: int, rng: random.Random) -> list[ConsumerRecord]:
    out = []
    for n in range(count):
        wallet = f"w{rng.randrange(wallets)}"
        value = b'{"v":1,"op":"charge","id":"c%d","wallet":"%s","amount":%d}' % (n, wallet.encode(), rng.randint(1, 1000))
        headers = [("reply_to", b"fg.replies"), ("correlation_id", b"c%d" % n)]
        out.append(ConsumerRecord("fg.commands", 0, n, 1_764_000_000_000 + n // 100, 1, wallet.encode(), value,
                                  None, len(wallet), len(value), headers))  # fmt: skip
    return out


def best(step, rounds: int = ROUNDS) -> tuple[float, object]:
    fastest, result = float("inf"), None
    for _ in range(rounds):
        began = time.perf_counter()
        result = step()
        fastest = min(fastest, time.perf_counter() - began)
    return fastest, result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commands", type=int, default=50_000)
    parser.add_argument("--wallets", type=int, default=10_000)
    args = parser.parse_args(argv)
    fetched = records(args.commands, args.wallets, random.Random(1))
    funded = {f"w{i}": Wallet(f"w{i}", 10**12, 0, 0, 2, 0) for i in range(args.wallets)}
    result: dict = {"commands": len(fetched), "us_per_command": steps(PYTHON, fetched, funded),
                    "python": sys.version.split()[0]}  # fmt: skip
    if COMPILED is not None:
        result["compiled_us_per_command"] = steps(COMPILED, fetched, funded)
    return result


def steps(path: HotPath, fetched: list[ConsumerRecord], funded: dict[str, Wallet]) -> dict[str, float]:
    def parsing():
        return [path.parse(as_record(raw.partition, raw), FORBIDDEN, 1) for raw in fetched]

    parse_s, parsed = best(parsing)

    def deciding():
        state = PartitionState(0, 0, dict(funded))
        return state, path.decide_batch(state, parsed)

    decide_s, (state, decided) = best(deciding)

    def rendering():
        return [rendered(decision, "fg.events", "fg.dlq", "fg.commands") for decision in decided]

    render_s, sent = best(rendering)
    stored = [(decision, encoded) for decision, (encoded, _) in zip(decided, sent, strict=True) if decision.stored]

    columns = COMPILED_COLUMNS if path.compiled and COMPILED_COLUMNS is not None else decision_columns

    def writing():
        return columns([d for d, _ in stored], [e for _, e in stored]), encode_records(
            [record for _, records in sent for record in records])

    columns_s, _ = best(writing)
    count = len(fetched)
    seconds = {"parse (record to command)": parse_s, "decide": decide_s, "render (reply and event bytes)": render_s,
               "rows of the batch's statements (decisions, outbox)": columns_s}  # fmt: skip
    report = {name: round(spent * 1e6 / count, 2) for name, spent in seconds.items()}
    report["total"] = round(sum(report.values()), 2)
    return report


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
