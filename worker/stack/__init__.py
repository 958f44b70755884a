"""The embedded local default stack: a single-node Kafka and a PostgreSQL, run from the repo.

`up()` installs what is missing (Maven-fetched broker jars, Debian packages when root), starts
both services and returns where they listen; `down()` stops them and keeps their data, which
live under `home()` (git-ignored `.floorguard/` by default). Standard library only, so it runs
before any dependency of the worker is installed. Progress goes to stderr; stdout is the CLI's.
"""

from __future__ import annotations

import fcntl
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from worker.stack import kafka, postgres

ENV_HOME = "FLOORGUARD_HOME"
LOCK_FILE_NAME = ".stack.lock"
MASTER_SECRET_FILE_NAME = "master.secret"
MASTER_SECRET_RANDOM_BYTES = 48


@dataclass(frozen=True)
class Endpoints:
    kafka_bootstrap: str
    database_url: str


def home() -> Path:
    """The data root: $FLOORGUARD_HOME, else `.floorguard/` at the repo root."""
    configured = os.environ.get(ENV_HOME)
    if configured:
        return Path(configured).expanduser().resolve()
    return Path(__file__).resolve().parents[2] / ".floorguard"


def up() -> Endpoints:
    """Idempotent: installs what is missing, starts what is stopped, returns the endpoints."""
    root = home()
    with _locked(root):
        database_url = postgres.up(root)
        kafka_bootstrap = kafka.up(root)
    return Endpoints(kafka_bootstrap=kafka_bootstrap, database_url=database_url)


def master_secret_file() -> Path:
    """The local ledger's master secret (keys' secrets are derived from it): made once, readable
    by its owner only, kept beside the stack's data."""
    path = home() / MASTER_SECRET_FILE_NAME
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(secrets.token_urlsafe(MASTER_SECRET_RANDOM_BYTES) + "\n")
    return path


def down() -> None:
    """Stops both services; their data stay for the next `up()`."""
    root = home()
    with _locked(root):
        kafka.down(root)
        postgres.down(root)


def status() -> list[str]:
    root = home()
    return [kafka.status_line(root), postgres.status_line(root)]


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    # Two `up()`s at once (say, two test suites) would both see "stopped" and race to start.
    root.mkdir(parents=True, exist_ok=True)
    with (root / LOCK_FILE_NAME).open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


__all__ = ["Endpoints", "down", "home", "master_secret_file", "status", "up"]
