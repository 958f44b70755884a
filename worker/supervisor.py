"""`floorguard worker --processes N`: N worker processes in one consumer group.

Python's lock on the interpreter keeps one worker on one core, so a machine with more cores (and a
topic with more partitions) runs more processes; Kafka's group hands each its share of the
partitions and moves them when one stops. This supervisor only starts them, gives each its own
metrics port (the configured one plus its index), forwards SIGINT and SIGTERM, and starts again a
process that died, after a growing pause. A process that refuses its configuration stops them all.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

from worker.config import ENV_METRICS_PORT, Settings

RESTART_PAUSE_FIRST_S = 1.0
RESTART_PAUSE_MAX_S = 30.0
EXIT_MISCONFIGURED = 2  # the worker's exit code when the topics or settings are wrong: no use retrying
STOP_WAIT_S = 40.0  # the worker's graceful shutdown takes up to 30 s

log = logging.getLogger("floorguard.supervisor")


def supervise(processes: int, settings: Settings) -> int:
    stopping: list[int] = []

    def stop(signum: int, _frame) -> None:
        stopping.append(signum)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    children = {index: _start(index, settings) for index in range(processes)}
    pauses = {index: RESTART_PAUSE_FIRST_S for index in children}
    restart_at: dict[int, float] = {}
    code = 0
    while not stopping:
        time.sleep(0.2)
        for index, child in list(children.items()):
            if child is None or child.poll() is None:
                continue
            log.warning("worker process %d (pid %d) exited with %d", index, child.pid, child.returncode)
            if child.returncode == EXIT_MISCONFIGURED:
                stopping.append(signal.SIGTERM)
                code = EXIT_MISCONFIGURED
                break
            children[index] = None
            restart_at[index] = time.monotonic() + pauses[index]
            pauses[index] = min(pauses[index] * 2, RESTART_PAUSE_MAX_S)
        for index, at in list(restart_at.items()):
            if not stopping and time.monotonic() >= at:
                del restart_at[index]
                children[index] = _start(index, settings)
    running = [child for child in children.values() if child is not None and child.poll() is None]
    for child in running:
        child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_WAIT_S
    for child in running:
        try:
            child.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            log.warning("worker process pid %d did not stop in time: killed", child.pid)
            child.kill()
            child.wait()
    return code


def _start(index: int, settings: Settings) -> subprocess.Popen:
    env = dict(os.environ)
    if settings.metrics_port:
        env[ENV_METRICS_PORT] = str(settings.metrics_port + index)
    # A group of its own: a Ctrl-C reaches the supervisor only, which stops the workers one way.
    child = subprocess.Popen([sys.executable, "-m", "worker.cli", "worker"], env=env, process_group=0)
    log.info("worker process %d started (pid %d)", index, child.pid)
    return child
