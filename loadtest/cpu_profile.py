"""Where one worker's CPU goes when it is saturated: py-spy samples the worker during a load run,
and each sample is put in the first category its stack matches (the order below matters: parsing
calls json.loads, so it is counted as parsing, not as the event loop).

    .venv/bin/python loadtest/cpu_profile.py --distribution hot --wallets 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import load  # noqa: E402

SAMPLES_PER_S = 200  # sampled without pausing the worker (--nonblocking), so that it runs at its speed
WARM_UP_S = 3  # the run's first seconds, before batches reach their size under load
CATEGORIES = (  # (name, what a frame of the sampled stack contains)
    ("parse and validate commands (core; json.loads)", "parse (worker/core/parse.py"),
    ("encode replies, events and stored replies (json.dumps)", "dumps (json"),
    ("decide (core)", "decide_batch"),
    ("PostgreSQL round trips (asyncpg)", "asyncpg/"),
    ("send replies and events (aiokafka producer)", "aiokafka/producer"),
    ("fetch commands (aiokafka consumer)", "aiokafka/consumer"),
)
REST = "the rest: event loop, FastStream's dispatch, asyncio tasks"
IDLE = ("Condition.wait", "Event.wait")  # threads that sleep


async def sample(pid: int, seconds: float, out: Path) -> None:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    await asyncio.sleep(WARM_UP_S)
    process = await asyncio.create_subprocess_exec(
        spy, "record", "--nonblocking", "-p", str(pid), "-d", str(int(seconds)), "-r", str(SAMPLES_PER_S), "-f", "raw", "-o", str(out),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)  # fmt: skip
    await process.wait()


def categorize(raw: Path) -> dict[str, float]:
    shares: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if any(idle in stack for idle in IDLE):
            continue
        name = next((name for name, needle in CATEGORIES if needle in stack), REST)
        shares[name] += int(count)
    total = sum(shares.values()) or 1
    return {name: round(100 * n / total, 1) for name, n in shares.most_common()}


async def profile(argv: list[str], current=None) -> dict:
    args = load.arguments(argv)
    with tempfile.TemporaryDirectory() as scratch:
        raw = Path(scratch) / "worker.txt"
        seconds = max(args.seconds - WARM_UP_S - 1, 1)
        run = await load.main(args, current, on_offer=lambda pids: sample(pids[0], seconds, raw))
        shares = categorize(raw) if raw.exists() else {}
    return {"run": {k: v for k, v in run.items() if k != "timeline"}, "worker_cpu_percent": shares}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--distribution", default="hot")
    parser.add_argument("--wallets", default="1")
    parser.add_argument("--rate", default="8000")
    parser.add_argument("--seconds", default="12")
    own = parser.parse_args()
    outcome = asyncio.run(profile(["--distribution", own.distribution, "--wallets", own.wallets,
                                   "--rate", own.rate, "--seconds", own.seconds]))  # fmt: skip
    print(json.dumps(outcome, indent=1))
