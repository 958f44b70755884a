"""Where one worker's CPU goes when it is saturated, by what its sampled stacks were doing.

py-spy samples the worker during a drain (a preloaded backlog, `loadtest/drain.py`) or a load run
(`loadtest/load.py`), and each sample is put in the first category its stack matches (the order
below matters: rendering runs inside the store's write, so it is counted as rendering, not as the
store).

    .venv/bin/python loadtest/cpu_profile.py --drain --distribution hot --wallets 1
    .venv/bin/python loadtest/cpu_profile.py --distribution hot --wallets 1 --rate 8000 --seconds 12
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
import drain  # noqa: E402
import load  # noqa: E402

SAMPLES_PER_S = 200  # sampled without pausing the worker (--nonblocking), so that it runs at its speed; drain.py too
WARM_UP_S = 3  # a load run's first seconds, before batches reach their size under load
TOP_FUNCTIONS = 15
ROOT = Path(__file__).resolve().parents[1]


def call_site(path: str, call: str) -> str:
    """The frame text of the line in `path` that makes `call`: what py-spy shows as the innermost
    Python frame while the compiled path (native/), which has no Python frame of its own, runs it."""
    lines = (ROOT / path).read_text().splitlines()
    return f"({path}:{next(n for n, line in enumerate(lines, 1) if call in line)})"


# (name, what a frame of the sampled stack contains: any of these). A frame reads
# "Qualified.name (path/in/its/package.py:line)".
CATEGORIES = (
    ("parse commands (core `parse`, compiled or not; the fetcher's `as_record`)",
     ("parse (worker/core/parse.py", "as_record (worker/adapter/fetch_guard.py",
      call_site("worker/adapter/processor.py", "batch.append(parse(record, forbidden, count))"))),
    ("decide (core `decide_batch`, compiled or not)",
     ("decide_batch (worker/core/decide.py", call_site("worker/decider.py", "self._decide_batch(state, records)"))),
    ("render replies and events (core `rendered`)",
     ("rendered (worker/core/outgoing.py", "Processor.render (worker/adapter/processor.py")),
    ("PostgreSQL: reads, rows, COPY and statements (worker/store; asyncpg)", ("worker/store/", "asyncpg/")),
    ("publish replies and events (`Publisher.publish`; aiokafka producer)",
     ("publish (worker/adapter/publisher.py", "aiokafka/producer/")),
    ("fetch commands (aiokafka consumer `getmany`, `fetched_records`; the fetch guard)",
     ("aiokafka/consumer/", "worker/adapter/fetch_guard.py")),
    ("the worker's own orchestration (worker/adapter/processor.py, worker/decider.py)",
     ("worker/adapter/processor.py", "worker/decider.py")),
    ("FastStream's dispatch (faststream, fast_depends)", ("faststream/", "fast_depends/")),
)  # fmt: skip
REST = "the rest: the event loop (uvloop, asyncio), metrics, sweeper"
IDLE = ("Condition.wait", "Event.wait")  # threads that sleep


async def sample(pid: int, seconds: float, out: Path) -> None:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    await asyncio.sleep(WARM_UP_S)
    process = await asyncio.create_subprocess_exec(
        spy, "record", "--nonblocking", "-p", str(pid), "-d", str(int(seconds)), "-r", str(SAMPLES_PER_S), "-f", "raw", "-o", str(out),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)  # fmt: skip
    await process.wait()


def busy_stacks(raw: Path) -> list[tuple[str, int]]:
    """(stack, samples) of py-spy's folded output, without the threads that sleep."""
    stacks = []
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not any(idle in stack for idle in IDLE):
            stacks.append((stack, int(count)))
    return stacks


def categorize(raw: Path) -> dict[str, float]:
    shares: Counter[str] = Counter()
    for stack, count in busy_stacks(raw):
        name = next((name for name, needles in CATEGORIES if any(needle in stack for needle in needles)), REST)
        shares[name] += count
    total = sum(shares.values()) or 1
    return {name: round(100 * n / total, 1) for name, n in shares.most_common()}


def top_functions(raw: Path, count: int = TOP_FUNCTIONS) -> list[tuple[float, str]]:
    """The innermost Python functions of the busy samples (their own time and that of the C code
    they call; share %), their lines merged. `Runner.run` innermost is the event loop's own C code."""
    own: Counter[str] = Counter()
    for stack, samples in busy_stacks(raw):
        frame = stack.rpartition(";")[2]
        own[frame.rpartition(":")[0] + ")"] += samples
    total = sum(own.values()) or 1
    return [(round(100 * n / total, 1), function) for function, n in own.most_common(count)]


def summary(raw: Path) -> dict:
    if not raw.exists():
        return {"busy_samples": 0, "worker_cpu_percent": {}, "top_functions": []}
    return {"busy_samples": sum(count for _, count in busy_stacks(raw)), "worker_cpu_percent": categorize(raw),
            "top_functions": top_functions(raw)}  # fmt: skip


async def profile(argv: list[str], current=None) -> dict:
    """A load run (`load.py`'s arguments), its worker sampled from WARM_UP_S in."""
    args = load.arguments(argv)
    with tempfile.TemporaryDirectory() as scratch:
        raw = Path(scratch) / "worker.txt"
        seconds = max(args.seconds - WARM_UP_S - 1, 1)
        run = await load.main(args, current, on_offer=lambda pids: sample(pids[0], seconds, raw))
        return {"run": {k: v for k, v in run.items() if k != "timeline"}, **summary(raw)}


async def profile_drain(argv: list[str]) -> dict:
    """A drain (`drain.py`'s arguments), its worker sampled by `drain.py --profile`: from
    drain.PROFILE_AFTER_S after the worker's start, for drain.PROFILE_SECONDS."""
    with tempfile.TemporaryDirectory() as scratch:
        raw = Path(scratch) / "worker.txt"
        run = await drain.main(drain.arguments([*argv, "--profile", str(raw)]))
        return {"run": run, "sampled_after_s": drain.PROFILE_AFTER_S, "sampled_s": drain.PROFILE_SECONDS,
                "samples_per_s": SAMPLES_PER_S, **summary(raw)}  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drain", action="store_true", help="profile a drain of a preloaded backlog, not a load run")
    parser.add_argument("--distribution", default="hot")
    parser.add_argument("--wallets", default="1")
    parser.add_argument("--commands", default="200000", help="with --drain: the backlog")
    parser.add_argument("--rate", default="8000", help="without --drain: commands offered per second")
    parser.add_argument("--seconds", default="12", help="without --drain: the load run's length")
    own = parser.parse_args()
    common = ["--distribution", own.distribution, "--wallets", own.wallets]
    if own.drain:
        outcome = asyncio.run(profile_drain([*common, "--commands", own.commands]))
    else:
        outcome = asyncio.run(profile([*common, "--rate", own.rate, "--seconds", own.seconds]))
    print(json.dumps(outcome, indent=1))
