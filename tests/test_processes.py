"""`floorguard worker --processes N`: one group of N processes sharing the partitions."""

import asyncio
import os
import signal
import socket

from loadtest.load import shared_out
from tests.conftest import wait_until_serving


def free_ports(count: int) -> int:
    """A base port whose next `count` ports are free now."""
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + count < 65536 and all(_free(base + i) for i in range(1, count)):
            return base


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


async def test_processes_share_the_partitions_and_come_back(workers, ledger, settings):
    base = free_ports(2)
    supervisor = workers.start("--processes", "2", FLOORGUARD_METRICS_PORT=str(base))
    await wait_until_serving(ledger)
    first = await shared_out([base, base + 1], settings.partitions, timeout_s=30)
    assert all(first), first  # both processes decide a share

    wallets = [f"proc-{i}" for i in range(16)]  # spread over every partition
    for wallet in wallets:
        await ledger.open(wallet)
        await ledger.credit(wallet, 10)
    assert [(await ledger.charge(wallet, 10)).balance for wallet in wallets] == [0] * len(wallets)

    # One process dies: the supervisor starts it again and the group shares the partitions again.
    victim = [int(line.split()[0]) for line in os.popen(f"pgrep -P {supervisor.pid} -a").read().splitlines()][0]
    os.kill(victim, signal.SIGKILL)
    await asyncio.sleep(1)
    again = await shared_out([base, base + 1], settings.partitions, timeout_s=30)
    assert all(again), again
    assert [(await ledger.credit(wallet, 1)).balance for wallet in wallets] == [1] * len(wallets)

    supervisor.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(supervisor.wait, 60) == 0
    assert os.popen(f"pgrep -P {supervisor.pid}").read() == ""
