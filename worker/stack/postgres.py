"""The local PostgreSQL cluster of the embedded stack, under `<home>/postgres/`.

It is our own cluster (own data folder, port and socket), run with the binaries of the Debian
`postgresql` package; a cluster that package may run on the standard port is left alone.
PostgreSQL refuses to run as root, so as root the server-side tools run as the `postgres` user.
Progress goes to stderr only: stdout belongs to the CLI.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from worker.config import LOCAL_DATABASE_URL, LOCAL_POSTGRES_PORT

PG_START_TIMEOUT_S = 60
PG_STOP_TIMEOUT_S = 60
PG_COMMAND_TIMEOUT_S = 120
PG_CONNECT_TIMEOUT_S = 10
APT_TIMEOUT_S = 1800
TCP_CONNECT_TIMEOUT_S = 1.0
LOG_TAIL_LINES = 40
# sun_path is 108 bytes on Linux, including the terminating NUL.
UNIX_SOCKET_PATH_MAX_BYTES = 107

SERVER_OS_USER = "postgres"
DEBIAN_LIB_DIR = Path("/usr/lib/postgresql")
DEBIAN_PACKAGE = "postgresql"
CONFIG_FILE_NAME = "floorguard.conf"
INCLUDE_LINE = f"include '{CONFIG_FILE_NAME}'"
INITDB_LOCALE = "C.UTF-8"

_URL = urlsplit(LOCAL_DATABASE_URL)
HOST = _URL.hostname or "127.0.0.1"
ROLE = _URL.username or "floorguard"
DATABASE = _URL.path.lstrip("/") or "floorguard"


@dataclass(frozen=True)
class Layout:
    """Where the cluster's files live under the data root."""

    root: Path

    @classmethod
    def under(cls, home: Path) -> Layout:
        return cls(home / "postgres")

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def startup_log(self) -> Path:
        # pg_ctl -l: only what the server says before its logging collector takes over.
        return self.root / "postgres.log"

    @property
    def log_dir(self) -> Path:
        return self.root / "log"

    @property
    def socket_dir(self) -> Path:
        socket_path = self.root / f".s.PGSQL.{LOCAL_POSTGRES_PORT}"
        if len(os.fsencode(socket_path)) <= UNIX_SOCKET_PATH_MAX_BYTES:
            return self.root
        return Path("/tmp")  # a deep checkout: the socket path would not fit in sun_path

    @property
    def initialized(self) -> bool:
        return (self.data / "PG_VERSION").exists()


def up(home: Path) -> str:
    """Install if missing, initialize once, start if stopped, create the database; returns its URL."""
    layout = Layout.under(home)
    bin_dir = bindir(layout)
    if _running_pid(layout, bin_dir) is None:
        _refuse_foreign_listener()
        _prepare_dirs(layout)
        if not layout.initialized:
            _initdb(layout, bin_dir)
        _write_config(layout)
        _start(layout, bin_dir)
    _ensure_database(bin_dir)
    return LOCAL_DATABASE_URL


def down(home: Path) -> None:
    layout = Layout.under(home)
    if not layout.initialized:
        return
    bin_dir = bindir(layout)
    pid = _running_pid(layout, bin_dir)
    if pid is None:
        return
    _say(f"postgresql: stopping (pid {pid})")
    _server_tool(layout, [str(bin_dir / "pg_ctl"), "-D", str(layout.data), "-m", "fast", "-w",
                          "-t", str(PG_STOP_TIMEOUT_S), "stop"])
    _say("postgresql: stopped")


def status_line(home: Path) -> str:
    layout = Layout.under(home)
    if not layout.initialized:
        return "postgresql: not installed"
    try:
        pid = _running_pid(layout, bindir(layout))
    except RuntimeError as error:
        return f"postgresql: unknown ({error})"
    if pid is None:
        return "postgresql: stopped"
    return f"postgresql: running (pid {pid}) on {HOST}:{LOCAL_POSTGRES_PORT}, data {_display(layout.data)}"


def bindir(layout: Layout | None = None) -> Path:
    """The server binaries: those matching an existing cluster's version, else the newest installed."""
    if layout is not None and layout.initialized:
        version = (layout.data / "PG_VERSION").read_text().strip()
        matching = DEBIAN_LIB_DIR / version / "bin"
        if (matching / "pg_ctl").exists():
            return matching
        raise RuntimeError(
            f"postgresql: the cluster in {layout.data} is version {version}, but {matching} has no pg_ctl; "
            f"install the Debian package postgresql-{version}"
        )
    found = _newest_bindir()
    if found is None:
        _install()
        found = _newest_bindir()
    if found is None:
        raise RuntimeError(f"postgresql: installed the {DEBIAN_PACKAGE} package but found no pg_ctl")
    return found


# --- installation -------------------------------------------------------------------------


def _newest_bindir() -> Path | None:
    candidates = [d / "bin" for d in DEBIAN_LIB_DIR.glob("*") if (d / "bin" / "pg_ctl").exists()]
    if candidates:
        return max(candidates, key=lambda b: _version_key(b.parent.name))
    return _pg_config_bindir()


def _pg_config_bindir() -> Path | None:
    # Non-Debian layouts: pg_config names the bin dir of the one installed server.
    if shutil.which("pg_config") is None:
        return None
    done = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
    found = Path(done.stdout.strip())
    return found if done.returncode == 0 and (found / "pg_ctl").exists() else None


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", name)) or (0,)


def _install() -> None:
    if os.geteuid() != 0:
        raise RuntimeError(
            f"postgresql: no server binaries found; install the Debian package {DEBIAN_PACKAGE} "
            f"(as root: apt-get update && apt-get install -y {DEBIAN_PACKAGE}) and retry"
        )
    # The package's post-install may start its own cluster on port 5432; that one is left alone.
    _say(f"postgresql: server binaries not found, installing the {DEBIAN_PACKAGE} package")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update"], ["apt-get", "install", "-y", DEBIAN_PACKAGE]):
        done = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=2, stderr=2, env=env, timeout=APT_TIMEOUT_S)
        if done.returncode != 0:
            raise RuntimeError(f"postgresql: `{' '.join(command)}` failed with exit code {done.returncode}")


# --- cluster ------------------------------------------------------------------------------


def _prepare_dirs(layout: Layout) -> None:
    layout.root.mkdir(parents=True, exist_ok=True)
    if not _as_root():
        return
    user = pwd.getpwnam(SERVER_OS_USER)
    os.chown(layout.root, user.pw_uid, user.pw_gid)
    _make_ancestors_traversable(layout.root)


def _make_ancestors_traversable(path: Path) -> None:
    """The server user must be able to walk down to its folder through root-owned folders."""
    for folder in path.resolve().parents:
        mode = folder.stat().st_mode
        if not mode & stat.S_IXOTH:
            _say(f"postgresql: allowing others to traverse {folder} (the server runs as {SERVER_OS_USER})")
            folder.chmod(mode | stat.S_IXOTH)


def _initdb(layout: Layout, bin_dir: Path) -> None:
    if layout.data.exists() and any(layout.data.iterdir()):
        raise RuntimeError(f"postgresql: {layout.data} is neither empty nor a cluster (no PG_VERSION); move it away")
    _say(f"postgresql: initializing a cluster in {_display(layout.data)}")
    base = [str(bin_dir / "initdb"), "-D", str(layout.data), "-U", ROLE, "--auth=trust", "-E", "UTF8"]
    done = _server_run(layout, [*base, f"--locale={INITDB_LOCALE}"])
    if done.returncode != 0 and "locale" in done.stdout.lower():
        _say(f"postgresql: locale {INITDB_LOCALE} unavailable, initializing with --no-locale")
        done = _server_run(layout, [*base, "--no-locale"])
    if done.returncode != 0:
        raise RuntimeError(f"postgresql: initdb failed:\n{done.stdout}")


def _write_config(layout: Layout) -> None:
    """Our settings in their own file, included once from postgresql.conf; rewritten every start."""
    settings = {
        "port": str(LOCAL_POSTGRES_PORT),
        "listen_addresses": _quote(HOST),
        "unix_socket_directories": _quote(str(layout.socket_dir)),
        "max_connections": "200",
        "fsync": "on",
        "synchronous_commit": "on",
        "shared_buffers": _quote("256MB"),
        # One file per weekday, truncated when its day comes round again: a week of logs at most.
        "logging_collector": "on",
        "log_directory": _quote(str(layout.log_dir)),
        "log_filename": _quote("postgresql-%a.log"),
        "log_truncate_on_rotation": "on",
        "log_rotation_age": _quote("1d"),
        "log_rotation_size": "0",
    }
    header = "# Generated by worker/stack/postgres.py at every start; edits here are overwritten.\n"
    config = layout.data / CONFIG_FILE_NAME
    config.write_text(header + "".join(f"{k} = {v}\n" for k, v in settings.items()))
    main_config = layout.data / "postgresql.conf"
    if INCLUDE_LINE not in main_config.read_text().splitlines():
        with main_config.open("a") as f:
            f.write(f"\n# Settings of the floorguard local stack.\n{INCLUDE_LINE}\n")
    _give_to_server_user(config)


def _start(layout: Layout, bin_dir: Path) -> None:
    _say(f"postgresql: starting on {HOST}:{LOCAL_POSTGRES_PORT}")
    layout.startup_log.write_text("")  # truncated each start: it only holds start-up messages
    _give_to_server_user(layout.startup_log)
    try:
        _server_tool(layout, [str(bin_dir / "pg_ctl"), "-D", str(layout.data), "-l", str(layout.startup_log),
                              "-w", "-t", str(PG_START_TIMEOUT_S), "start"])
    except RuntimeError as error:
        raise RuntimeError(f"{error}\n{_tail(layout)}") from None
    _say("postgresql: ready")


def _ensure_database(bin_dir: Path) -> None:
    exists = _client(bin_dir, "psql", "-d", "postgres", "-tAq", "-c",
                     f"select 1 from pg_database where datname = {_quote(DATABASE)}")
    if exists.strip() != "1":
        _say(f"postgresql: creating database {DATABASE} owned by {ROLE}")
        _client(bin_dir, "createdb", "-O", ROLE, DATABASE)


def _running_pid(layout: Layout, bin_dir: Path) -> int | None:
    """`pg_ctl status`: it also sees through a stale postmaster.pid left by a crash."""
    if not layout.initialized:
        return None
    done = _server_run(layout, [str(bin_dir / "pg_ctl"), "-D", str(layout.data), "status"])
    match = re.search(r"PID: (\d+)", done.stdout)
    return int(match.group(1)) if done.returncode == 0 and match else None


def _refuse_foreign_listener() -> None:
    try:
        with socket.create_connection((HOST, LOCAL_POSTGRES_PORT), timeout=TCP_CONNECT_TIMEOUT_S):
            pass
    except OSError:
        return
    raise RuntimeError(
        f"postgresql: port {HOST}:{LOCAL_POSTGRES_PORT} is taken by a server this stack did not start; "
        "stop it and retry"
    )


# --- running commands ---------------------------------------------------------------------


def _server_tool(layout: Layout, command: list[str]) -> None:
    done = _server_run(layout, command)
    if done.returncode != 0:
        raise RuntimeError(f"postgresql: `{' '.join(command)}` failed:\n{done.stdout}")


def _server_run(layout: Layout, command: list[str]) -> subprocess.CompletedProcess[str]:
    """Run a server-side tool as the server user (they refuse root), in a folder that user can read."""
    if _as_root():
        command = ["runuser", "-u", SERVER_OS_USER, "--", *command]
    cwd = layout.root if layout.root.exists() else None
    return subprocess.run(command, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=PG_COMMAND_TIMEOUT_S, env=_env())


def _client(bin_dir: Path, tool: str, *args: str) -> str:
    command = [str(bin_dir / tool), "-h", HOST, "-p", str(LOCAL_POSTGRES_PORT), "-U", ROLE, *args]
    done = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=PG_COMMAND_TIMEOUT_S, env=_env())
    if done.returncode != 0:
        raise RuntimeError(f"postgresql: `{' '.join(command)}` failed:\n{done.stdout}{done.stderr}")
    return done.stdout


def _env() -> dict[str, str]:
    # Our server, not whatever PG* variables the user's shell points at.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGCONNECT_TIMEOUT"] = str(PG_CONNECT_TIMEOUT_S)
    return env


def _give_to_server_user(path: Path) -> None:
    if _as_root():
        user = pwd.getpwnam(SERVER_OS_USER)
        os.chown(path, user.pw_uid, user.pw_gid)


def _as_root() -> bool:
    return os.geteuid() == 0


def _tail(layout: Layout) -> str:
    parts = [layout.startup_log, *sorted(layout.log_dir.glob("*.log"), key=lambda p: p.stat().st_mtime)[-1:]]
    text = ""
    for path in parts:
        try:
            lines = path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        except OSError:
            continue
        text += f"--- last lines of {path} ---\n" + "\n".join(lines) + "\n"
    return text


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _display(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
