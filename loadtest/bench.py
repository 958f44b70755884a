"""The standard benchmark suite (`make bench`): floorguard end to end beside the seed design and a
naive design, at this machine's flush cost and at an emulated 0.5 ms one; the latency run; replay.
Writes docs/BENCHMARKS.md, docs/bench/results.json and docs/bench/latency.png.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "loadtest"))

import baselines  # noqa: E402
import load  # noqa: E402
import cpu_profile as worker_profile  # noqa: E402
import slowpg  # noqa: E402

from worker.cli import settings as resolve_settings  # noqa: E402

OUT = ROOT / "docs" / "bench"
SATURATION_RATE_PER_S = 8_000  # offered well past what the worker sustains here, for a short while
SATURATION_SECONDS = 6
LATENCY_RATE_PER_S = 5_000  # the target's offered rate; the plot is of this run
LATENCY_RATES_BELOW_PER_S = (1_000, 2_500)  # where the latency stands below saturation
LATENCY_SECONDS = 15
FLUSHES = (("this disk", None), ("0.5 ms emulated", 500))


async def floorguard(current, server_url: str, distribution: str, wallets: int, rate: int, seconds: int,
                     workers: int = 1) -> dict:  # fmt: skip
    args = load.arguments(["--rate", str(rate), "--seconds", str(seconds), "--distribution", distribution,
                           "--wallets", str(wallets), "--workers", str(workers)])  # fmt: skip
    return await load.main(args, replace(current, database_url=server_url))


async def suite() -> dict:
    current = resolve_settings()
    results: dict = {"machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "runs": {}}
    for label, flush_us in FLUSHES:
        server_url = current.database_url if flush_us is None else slowpg.up(flush_us)
        try:
            print(f"bench: {label}: baselines", file=sys.stderr)
            seed_hot, seed_many, naive = await baselines.run_all(server_url, seconds=4)
            print(f"bench: {label}: floorguard", file=sys.stderr)
            hot = await floorguard(current, server_url, "hot", 1, SATURATION_RATE_PER_S, SATURATION_SECONDS)
            many = await floorguard(current, server_url, "uniform", 10_000, SATURATION_RATE_PER_S, SATURATION_SECONDS)
            many_2 = await floorguard(current, server_url, "uniform", 10_000, SATURATION_RATE_PER_S,
                                      SATURATION_SECONDS, workers=2)  # fmt: skip
        finally:
            if flush_us is not None:
                slowpg.down()
        results["runs"][label] = {"seed_hot": seed_hot, "seed_many": seed_many, "naive": naive,
                                  "floorguard_hot": hot, "floorguard_many": many, "floorguard_many_2": many_2}  # fmt: skip
    print("bench: latency at fixed offered rates", file=sys.stderr)
    results["latency_below"] = [await floorguard(current, current.database_url, "zipf", 10_000, rate, LATENCY_SECONDS)
                                for rate in LATENCY_RATES_BELOW_PER_S]  # fmt: skip
    results["latency"] = await floorguard(current, current.database_url, "zipf", 10_000, LATENCY_RATE_PER_S, LATENCY_SECONDS)
    print("bench: profile of a saturated worker", file=sys.stderr)
    results["profile"] = await worker_profile.profile(["--distribution", "hot", "--wallets", "1", "--rate",
                                                       str(SATURATION_RATE_PER_S), "--seconds", "12"], current)  # fmt: skip
    results["fsync"] = {"this disk": slowpg.test_fsync(0), "0.5 ms emulated": slowpg.test_fsync(500)}
    replay = subprocess.run([sys.executable, str(ROOT / "loadtest" / "replay_bench.py"), "--commands", "100000",
                             "--wallets", "1000"], capture_output=True, text=True, check=True)  # fmt: skip
    results["replay"] = json.loads(replay.stdout.strip().splitlines()[-1])
    return results


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown")  # fmt: skip
    postgres = subprocess.run([str(slowpg.bin_dir() / "postgres"), "--version"], capture_output=True, text=True).stdout.strip()
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "postgres": postgres,
            "kafka": "Apache Kafka 4.1.1 (KRaft, one node)"}  # fmt: skip


def plot(latency_run: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timeline = latency_run["timeline"]
    seconds = [t[0] for t in timeline]
    figure, throughput = plt.subplots(figsize=(9, 4.5))
    throughput.plot(seconds, [t[1] for t in timeline], color="tab:blue", label="replies/s")
    throughput.axhline(latency_run["offered_per_s"], color="tab:blue", linestyle=":", label="offered/s")
    throughput.set_xlabel("seconds into the run")
    throughput.set_ylabel("replies per second", color="tab:blue")
    latency = throughput.twinx()
    latency.plot(seconds, [t[2] for t in timeline], color="tab:red", label="mean latency (ms)")
    latency.set_ylabel("mean reply latency (ms)", color="tab:red")
    figure.suptitle(f"floorguard, open loop at {latency_run['offered_per_s']:,}/s offered, "
                    f"{latency_run['distribution']} over {latency_run['wallets']:,} wallets")  # fmt: skip
    figure.legend(loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def why(results: dict) -> list[str]:
    """Why the targets are missed, from this run's figures."""
    profiled = results["profile"]
    hot = results["runs"]["this disk"]
    two = hot["floorguard_many_2"]["answered_per_s"]
    low = results["latency_below"][0]
    lines = [
        "## Why the targets are missed, and what would close them", "",
        f"`loadtest/cpu_profile.py` (py-spy, {worker_profile.SAMPLES_PER_S} samples/s) on one worker saturated by the hot "
        f"wallet at {profiled['run']['offered_per_s']:,}/s offered ({profiled['run']['answered_per_s']:,}/s answered): "
        "share of the worker's busy samples, each in the first category its stack matches.", "",
        "| where the worker's CPU went | share |", "|---|---|",
        *[f"| {name} | {share}% |" for name, share in profiled["worker_cpu_percent"].items()], "",
        "- **The worker is a single Python process and it is CPU-bound, not disk-bound.** PostgreSQL round trips, "
        "the part the seed design spends its time on, are a small share: batching has moved the cost from the "
        "row lock and the flush to per-record Python work (parsing, encoding two JSON documents per decision, "
        "one aiokafka `send` call per reply and per event). Python's lock on the interpreter keeps it on one core "
        f"(busy {results['runs']['this disk']['floorguard_hot']['cores_busy']['worker']} of a core on average in the "
        "hot run, the rest being waits on the database and the broker).",
        "- **The load generator, the broker and the database share the same 2 cores.** The generator is Python "
        "too and takes a large share of a core at the offered rate (\"Where the CPU went\"); at these per-record "
        "costs 20,000/s would need more than the whole machine for the generator, the broker and the database alone.",
        f"- **More processes help only as far as cores allow:** two worker processes over 10,000 wallets answered "
        f"{two:,}/s against {hot['floorguard_many']['answered_per_s']:,}/s for one, on a machine already near its 2 cores.",
        f"- **Latency:** at {low['offered_per_s']:,}/s offered the median reply took {low['latency_ms']['p50']} ms. "
        "A reply waits for the fetch it lands in, that fetch's transaction (a light fetch is one transaction over "
        "all its partitions: about ten statement round trips and one flush), the broker's acknowledgement of the "
        "replies (`acks=all`) and the client's own fetch; on 2 shared cores each of these steps queues behind the "
        "others' work. At 5,000/s offered the worker is past its limit, queues grow for the whole run, and the "
        "percentiles measure the queue.", "",
        "What would close the gap, in order of expected gain: encode each reply once and with a faster encoder "
        "(orjson; the core stays standard library behind an interface); send each partition's replies and events "
        "as one produce batch instead of one `send` per record (aiokafka's `create_batch`/`send_batch`); decide "
        "on the consumer's raw records without FastStream's per-batch dependency injection; and, above all, more "
        "cores: the design has one writer per partition, so worker processes scale with partitions and cores, "
        "while the seed design stays bound to the hot row's lock and flush.",
    ]  # fmt: skip
    return lines


def verdict(value: float, target: float, more_is_better: bool = True) -> str:
    met = value >= target if more_is_better else value <= target
    return "met" if met else "**missed**"


def report(results: dict) -> str:
    machine_ = results["machine"]
    lines = [
        "# Benchmarks", "",
        f"Measured {results['started']} by `make bench` (`loadtest/bench.py`), which rewrites this file. "
        "Broker, database, worker and load generator all run on this one machine.", "",
        f"**Machine:** {machine_['cores']} cores ({machine_['cpu']}), {machine_['postgres']}, {machine_['kafka']}, "
        f"Python {machine_['python']}. `pg_test_fsync` fdatasync: this disk {results['fsync']['this disk']}; "
        f"with the emulation library {results['fsync']['0.5 ms emulated']}.", "",
        "## Throughput against the targets", "",
        "floorguard: one worker process, 8 partitions, open loop offered "
        f"{SATURATION_RATE_PER_S:,}/s for {SATURATION_SECONDS} s (past what it sustains), answered/s = replies received "
        "÷ time until the last reply. Seed: the seed design's guarded statement, one commit per charge, best of 8/32/64 "
        "clients, closed loop.", "",
        "| flush | workload | floorguard answered/s | seed design/s | floorguard ÷ seed | target |",
        "|---|---|---|---|---|---|",
    ]
    for label, run in results["runs"].items():
        for key, seed_key, name, target, ratio in (("floorguard_hot", "seed_hot", "one hot wallet", 20_000,
                                                     2 if label == "this disk" else 10),
                                                    ("floorguard_many", "seed_many", "10,000 wallets", 30_000, 1)):  # fmt: skip
            fg, seed = run[key]["answered_per_s"], run[seed_key]["charges_per_s"]
            lines.append(f"| {label} | {name} | {fg:,} | {seed:,} ({run[seed_key]['clients']} clients) | "
                         f"{fg / seed:.2f}× | ≥ {target:,}/s: {verdict(fg, target)}; ≥ {ratio}× seed: "
                         f"{verdict(fg / seed, ratio)} |")  # fmt: skip
        fg, seed = run["floorguard_many_2"]["answered_per_s"], run["seed_many"]["charges_per_s"]
        lines.append(f"| {label} | 10,000 wallets, **2 worker processes** | {fg:,} | {seed:,} | {fg / seed:.2f}× | "
                     f"≥ 30,000/s: {verdict(fg, 30_000)}; ≥ 1× seed: {verdict(fg / seed, 1)} |")  # fmt: skip
    latency = results["latency"]
    lines += [
        "", "## Reply latency, open loop", "",
        f"Offered for {latency['seconds']} s each, {latency['distribution']} over {latency['wallets']:,} wallets, "
        "5% holds (reserve then capture/release), 5% retries, one worker process.", "",
        "| offered/s | p50 | p99 | p99.9 | max | answered/s | target |", "|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for run in [*results["latency_below"], latency]:
        ms = run["latency_ms"]
        target = (f"p50 ≤ 5 ms: {verdict(ms['p50'], 5, False)}; p99 ≤ 25 ms: {verdict(ms['p99'], 25, False)}"
                  if run is latency else "(below the target's rate)")  # fmt: skip
        lines.append(f"| {run['offered_per_s']:,} | {ms['p50']} ms | {ms['p99']} ms | {ms['p999']} ms | {ms['max']} ms | "
                     f"{run['answered_per_s']:,} | {target} |")  # fmt: skip
    lines += [
        "", f"![throughput and latency over time, {latency['offered_per_s']:,}/s offered](bench/latency.png)", "",
        "## Where the CPU went", "",
        "Cores each part kept busy, on average, from the first command offered to the last reply (the machine has "
        f"{machine_['cores']}), read from `/proc` by `loadtest/load.py`:", "",
        "| run | worker | load generator | kafka | postgresql | total |", "|---|---|---|---|---|---|",
    ]  # fmt: skip
    cpu_runs = [(f"{label}, {key}", run[key]) for label, run in results["runs"].items()
                for key in ("floorguard_hot", "floorguard_many", "floorguard_many_2")]  # fmt: skip
    for name, run in [*cpu_runs, (f"latency at {latency['offered_per_s']:,}/s", latency)]:
        busy = run["cores_busy"]
        lines.append(f"| {name} | {busy['worker']} | {busy['load generator']} | {busy['kafka']} | {busy['postgresql']} | "
                     f"{sum(busy.values()):.2f} |")  # fmt: skip
    lines += ["", *why(results), "",
        "## Correctness in every run", "",
        "| run | overshoot (wallets below floor) | ids with two decisions | wallets off their books | sends without reply | worker RSS at end |",
        "|---|---|---|---|---|---|",
    ]  # fmt: skip
    named = [(f"{label}, {key}", run[key]) for label, run in results["runs"].items()
             for key in ("floorguard_hot", "floorguard_many", "floorguard_many_2")]  # fmt: skip
    below = [(f"latency at {run['offered_per_s']:,}/s", run) for run in results["latency_below"]]
    for name, run in [*named, *below, (f"latency at {latency['offered_per_s']:,}/s", latency)]:
        c = run["checks"]
        lines.append(f"| {name} | {c['wallets_below_floor']} | {c['ids_with_two_decisions']} | "
                     f"{c['wallets_off_their_books']} | {c['sends_without_reply']} | {run['worker_resident_mib']} MiB |")  # fmt: skip
    lines += ["", "## The naive design (read, check, write), for contrast", "",
              "| flush | funded for | accepted | overshoot |", "|---|---|---|---|"]
    for label, run in results["runs"].items():
        n = run["naive"]
        lines.append(f"| {label} | {n['funded_for']:,} charges | {n['accepted']:,} | {n['overshoot_charges']:,} charges "
                     f"({n['overshoot_amount']:,} units) past the funds |")  # fmt: skip
    replay = results["replay"]
    lines += ["", "## Replay", "",
              f"`loadtest/replay_bench.py --commands 100000 --wallets 1000`: {replay['commands']:,} commands in "
              f"{replay['seconds']} s, **{replay['commands_per_s']:,} commands/s**.", "",
              "Raw results: [bench/results.json](bench/results.json).", ""]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    began = time.monotonic()
    OUT.mkdir(parents=True, exist_ok=True)
    outcome = asyncio.run(suite())
    (OUT / "results.json").write_text(json.dumps(outcome, indent=1))
    plot(outcome["latency"], OUT / "latency.png")
    (ROOT / "docs" / "BENCHMARKS.md").write_text(report(outcome))
    print(f"bench: done in {time.monotonic() - began:,.0f} s; docs/BENCHMARKS.md written", file=sys.stderr)
