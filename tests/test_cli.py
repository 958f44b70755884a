"""The operator's command line against the real services: readable, --json, exit codes."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

from tests.conftest import ROOT, wait_until_serving, worker_env


def floorguard(settings, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "worker.cli", *args], cwd=ROOT, env=worker_env(settings),
                          capture_output=True, text=True, timeout=120)  # fmt: skip


async def test_wallet_open_credit_charge_show_and_a_refusal(workers, ledger, settings):
    workers.start()
    await wait_until_serving(ledger)

    def run(*args: str) -> subprocess.CompletedProcess:
        return floorguard(settings, *args)

    opened = await asyncio.to_thread(run, "wallet", "open", "cli-w", "--floor", "-5")
    assert opened.returncode == 0 and "accepted" in opened.stdout, opened.stderr
    credited = await asyncio.to_thread(run, "--json", "wallet", "credit", "cli-w", "10")
    assert json.loads(credited.stdout)["balance"] == 10
    charged = await asyncio.to_thread(run, "--json", "charge", "cli-w", "15", "--id", "cli-c1")
    assert json.loads(charged.stdout)["available"] == 0 and charged.returncode == 0
    refused = await asyncio.to_thread(run, "charge", "cli-w", "1")
    assert refused.returncode == 1 and "402 insufficient_funds" in refused.stdout
    again = await asyncio.to_thread(run, "--json", "charge", "cli-w", "15", "--id", "cli-c1")
    assert json.loads(again.stdout)["duplicate"] is True
    shown = await asyncio.to_thread(run, "--json", "wallet", "show", "cli-w")
    assert json.loads(shown.stdout) == {"wallet": "cli-w", "balance": -5, "reserved": 0, "floor": -5,
                                        "available": 0, "seq": 4}  # fmt: skip


def test_stack_up_prints_exactly_two_exports_when_the_services_are_named(settings):
    result = floorguard(settings, "stack", "up")
    lines = result.stdout.splitlines()
    assert result.returncode == 0 and len(lines) == 2
    assert lines[0] == f"export FLOORGUARD_KAFKA_BOOTSTRAP={settings.kafka_bootstrap}"
    assert lines[1].startswith("export FLOORGUARD_DATABASE_URL=")


async def test_holds_and_prices_from_the_command_line(workers, ledger, settings):
    workers.start()
    await wait_until_serving(ledger)

    def run(*args: str) -> subprocess.CompletedProcess:
        return floorguard(settings, *args)

    await ledger.open("cli-h")
    await ledger.credit("cli-h", 1_000)
    reserved = json.loads((await asyncio.to_thread(run, "--json", "reserve", "cli-h", "300", "--id", "job-1")).stdout)
    assert reserved["hold"] == "job-1" and reserved["available"] == 700
    extended = await asyncio.to_thread(run, "extend", "cli-h", "job-1", "100", "--json")
    assert json.loads(extended.stdout)["reserved"] == 400
    captured = await asyncio.to_thread(run, "capture", "cli-h", "job-1", "250", "--json")
    assert json.loads(captured.stdout)["balance"] == 750
    closed = await asyncio.to_thread(run, "release", "cli-h", "job-1")
    assert closed.returncode == 1 and "hold_closed" in closed.stdout
    added = await asyncio.to_thread(run, "price", "add", "model-y", "--input", "3", "--output", "15")
    assert added.returncode == 0, added.stderr
    too_soon = await asyncio.to_thread(run, "price", "add", "model-y", "--input", "1", "--output", "1",
                                       "--from", "2020-01-01T00:00:00Z")  # fmt: skip
    assert too_soon.returncode == 1
    listed = await asyncio.to_thread(run, "price", "list", "--json")
    assert [json.loads(line)["model"] for line in listed.stdout.splitlines()] == ["model-y"]
