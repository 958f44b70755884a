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
