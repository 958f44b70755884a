"""A second local PostgreSQL whose every flush costs `--flush-us` more, for the benchmarks.

Builds loadtest/slowfsync.c into a shared library and starts a cluster under .floorguard/bench/
with it preloaded (LD_PRELOAD), on port 25433. `pg_test_fsync` under the same library shows the
cost it adds. Prints the cluster's URL.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOME = ROOT / ".floorguard" / "bench"
PORT = 25433
LIBRARY = HOME / "slowfsync.so"


def bin_dir() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    assert found, "PostgreSQL's server binaries are missing: run `floorguard stack up` first"
    return found[-1].parent


def as_postgres(command: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    environment = ["env", *(f"{k}={v}" for k, v in (env or {}).items())] if env else []
    return subprocess.run([*prefix, *environment, *command], check=True, capture_output=True, text=True)


def build() -> Path:
    HOME.mkdir(parents=True, exist_ok=True)
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(LIBRARY), str(ROOT / "loadtest" / "slowfsync.c"),
                    "-ldl"], check=True)  # fmt: skip
    LIBRARY.chmod(0o755)
    return LIBRARY


def up(flush_us: int) -> str:
    library = build()
    data = HOME / "pg"
    if os.geteuid() == 0:
        shutil.chown(HOME, "postgres")
    if not (data / "PG_VERSION").exists():
        as_postgres([str(bin_dir() / "initdb"), "-D", str(data), "-U", "floorguard", "--auth=trust", "--no-locale",
                     "-E", "UTF8"])  # fmt: skip
    down()
    options = f"-p {PORT} -k {HOME} -c listen_addresses=127.0.0.1 -c max_connections=200 -c shared_buffers=256MB"
    as_postgres([str(bin_dir() / "pg_ctl"), "-D", str(data), "-l", str(HOME / "pg.log"), "-o", options, "-w", "start"],
                env={"LD_PRELOAD": str(library), "SLOW_FSYNC_US": str(flush_us)})  # fmt: skip
    return f"postgresql://floorguard@127.0.0.1:{PORT}/postgres"


def down() -> None:
    data = HOME / "pg"
    if (data / "postmaster.pid").exists():
        as_postgres([str(bin_dir() / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"])


def test_fsync(flush_us: int) -> str:
    """pg_test_fsync's fdatasync line, under the library."""
    probe = HOME / "fsync-probe"
    result = subprocess.run([str(bin_dir() / "pg_test_fsync"), "-s", "1", "-f", str(probe)], capture_output=True,
                            text=True, env={**os.environ, "LD_PRELOAD": str(build()), "SLOW_FSYNC_US": str(flush_us)})  # fmt: skip
    probe.unlink(missing_ok=True)
    return next((line.strip() for line in result.stdout.splitlines() if "fdatasync" in line and "ops/sec" in line), "")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("up", "down", "test-fsync"))
    parser.add_argument("--flush-us", type=int, default=500)
    args = parser.parse_args()
    if args.action == "up":
        print(up(args.flush_us))
    elif args.action == "down":
        down()
    else:
        print(test_fsync(args.flush_us))
        print(test_fsync(0))
    sys.exit(0)
