"""The local single-node Kafka (KRaft, broker and controller in one JVM) of the embedded stack.

The broker's jars are gathered once with Maven from `kafka-pom.xml`; the storage is formatted
once with a cluster id kept beside it, so a restart resumes the same cluster and data.
Everything lives under `<home>/kafka/`. Progress goes to stderr only: stdout belongs to the CLI.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from worker.config import (
    KAFKA_ADMIN_USER,
    LOCAL_KAFKA_BOOTSTRAP,
    LOCAL_KAFKA_CONTROLLER_PORT,
    LOCAL_KAFKA_PORT,
    LOCAL_KAFKA_SASL_BOOTSTRAP,
    LOCAL_KAFKA_SASL_PORT,
    SASL_MECHANISM,
)

HOST = "127.0.0.1"
KAFKA_START_TIMEOUT_S = 120
KAFKA_STOP_TIMEOUT_S = 60
KAFKA_KILL_WAIT_S = 10
STORAGE_TOOL_TIMEOUT_S = 120
MAVEN_FETCH_TIMEOUT_S = 1800
APT_TIMEOUT_S = 1800
POLL_INTERVAL_S = 0.25
TCP_CONNECT_TIMEOUT_S = 1.0
LOG_TAIL_LINES = 40
LOG_TAIL_CHARS = 8000

MAIN_CLASS = "kafka.Kafka"
STORAGE_TOOL_CLASS = "kafka.tools.StorageTool"
READY_LINE = "Kafka Server started"
AUTHORIZER_CLASS = "org.apache.kafka.metadata.authorizer.StandardAuthorizer"
SCRAM_LOGIN_MODULE = "org.apache.kafka.common.security.scram.ScramLoginModule"
# Loopback PLAINTEXT (the default listener and the controller's) authenticates nobody: its principal
# is User:ANONYMOUS, a super user, so everything that runs today keeps running. ACLs bind the SCRAM
# users of the SASL listener, where agents and workers connect with their own names.
SUPER_USERS = ("User:ANONYMOUS", f"User:{KAFKA_ADMIN_USER}")
JVM_HEAP_OPTIONS = ("-Xms256m", "-Xmx1g")
DEBIAN_PACKAGES = ("default-jre-headless", "maven")

POM_PATH = Path(__file__).with_name("kafka-pom.xml")
LOG4J_CONFIG_PATH = Path(__file__).with_name("log4j2.properties")

# Kept in the process table (never garbage-collected) so a broker started by this process can be
# reaped when it stops: otherwise it lingers as a zombie that still looks alive to down().
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


@dataclass(frozen=True)
class Layout:
    """Where the broker's files live under the data root."""

    root: Path

    @classmethod
    def under(cls, home: Path) -> Layout:
        return cls(home / "kafka")

    @property
    def libs(self) -> Path:
        return self.root / "libs"

    @property
    def libs_marker(self) -> Path:
        # Written only after a complete fetch; holds the pom's digest so a changed pom refetches.
        return self.libs / ".complete"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def cluster_id_file(self) -> Path:
        return self.root / "cluster.id"

    @property
    def properties(self) -> Path:
        return self.root / "server.properties"

    @property
    def pid_file(self) -> Path:
        return self.root / "kafka.pid"

    @property
    def log(self) -> Path:
        # Written by log4j2 (rolling, see log4j2.properties).
        return self.root / "kafka.log"

    @property
    def console(self) -> Path:
        # The JVM's own stdout/stderr (crashes, bad options); truncated at every start.
        return self.root / "kafka.out"


def up(home: Path) -> str:
    """Install if missing, start if stopped, and wait until the broker serves; returns the bootstrap."""
    layout = Layout.under(home)
    pid = running_pid(layout)
    if pid is not None:
        _wait_port_open(layout, pid)
        if not _port_open(LOCAL_KAFKA_SASL_PORT):
            _say(f"kafka: this broker was started without the SASL listener {LOCAL_KAFKA_SASL_BOOTSTRAP}; "
                 "`floorguard stack down` then `up` adds it")  # fmt: skip
        return LOCAL_KAFKA_BOOTSTRAP
    _forget_stale_pid(layout)
    _refuse_foreign_listener()
    layout.root.mkdir(parents=True, exist_ok=True)
    _ensure_tools()
    _ensure_libs(layout)
    _write_properties(layout)
    _ensure_formatted(layout)
    _start(layout)
    return LOCAL_KAFKA_BOOTSTRAP


def down(home: Path) -> None:
    """Stop the broker: SIGTERM to its process group, then SIGKILL if it lingers. Data stay."""
    layout = Layout.under(home)
    pid = running_pid(layout)
    if pid is None:
        _forget_stale_pid(layout)
        return
    _say(f"kafka: stopping (pid {pid})")
    _signal_group(pid, signal.SIGTERM)
    if not _wait_exit(pid, KAFKA_STOP_TIMEOUT_S):
        _say(f"kafka: still running after {KAFKA_STOP_TIMEOUT_S} s, killing")
        _signal_group(pid, signal.SIGKILL)
        _wait_exit(pid, KAFKA_KILL_WAIT_S)
    layout.pid_file.unlink(missing_ok=True)
    _say("kafka: stopped")


def status_line(home: Path) -> str:
    layout = Layout.under(home)
    pid = running_pid(layout)
    if pid is None:
        return "kafka: stopped" if layout.root.exists() else "kafka: not installed"
    state = "running" if _port_open(LOCAL_KAFKA_PORT) else "starting"
    sasl = f", SASL {LOCAL_KAFKA_SASL_BOOTSTRAP}" if _port_open(LOCAL_KAFKA_SASL_PORT) else ""
    return f"kafka: {state} (pid {pid}) on {LOCAL_KAFKA_BOOTSTRAP}{sasl}, data {_display(layout.root)}"


def running_pid(layout: Layout) -> int | None:
    """Our live broker's pid: from the pid file if it names our broker (pids get reused), else found
    by its command line (the pid file was lost), in which case the pid file is written again."""
    try:
        pid = int(layout.pid_file.read_text().strip())
    except (FileNotFoundError, ValueError):
        pid = None
    if pid is not None and _is_our_broker(pid, layout):
        return pid
    found = _find_our_broker(layout)
    if found is not None:
        layout.pid_file.write_text(f"{found}\n")
    return found


def _find_our_broker(layout: Layout) -> int | None:
    wanted = [MAIN_CLASS.encode(), str(layout.properties).encode()]
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if all(arg in args for arg in wanted) and _alive(int(entry.name)):
            return int(entry.name)
    return None


# --- installation -------------------------------------------------------------------------


def _ensure_tools() -> None:
    missing = [tool for tool in ("java", "mvn") if shutil.which(tool) is None]
    if not missing:
        return
    packages = " ".join(DEBIAN_PACKAGES)
    if os.geteuid() != 0:
        raise RuntimeError(
            f"kafka: {' and '.join(missing)} not found; install the Debian packages {packages} "
            f"(as root: apt-get update && apt-get install -y {packages}) and retry"
        )
    _say(f"kafka: {' and '.join(missing)} not found, installing {packages}")
    _stream(["apt-get", "update"], APT_TIMEOUT_S)
    _stream(["apt-get", "install", "-y", *DEBIAN_PACKAGES], APT_TIMEOUT_S, _apt_env())


def _ensure_libs(layout: Layout) -> None:
    digest = hashlib.sha256(POM_PATH.read_bytes()).hexdigest()
    if _read(layout.libs_marker) == digest:
        return
    # A partial or outdated folder is worse than none: jars of two versions on one classpath.
    shutil.rmtree(layout.libs, ignore_errors=True)
    layout.libs.mkdir(parents=True)
    _say(f"kafka: fetching broker jars with Maven into {_display(layout.libs)} (about half a minute)")
    command = [
        "mvn", "-q", "-B", "-f", str(POM_PATH), "dependency:copy-dependencies",
        f"-DoutputDirectory={layout.libs}", "-DincludeScope=runtime",
    ]
    # Captured, not streamed: quiet Maven still prints stray colour codes; its errors go in ours.
    done = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=MAVEN_FETCH_TIMEOUT_S)
    if done.returncode != 0:
        raise RuntimeError(f"kafka: `{' '.join(command)}` failed:\n{done.stdout[-LOG_TAIL_CHARS:]}")
    if not any(layout.libs.glob("kafka_2.13-*.jar")):
        raise RuntimeError(f"kafka: Maven finished but no kafka_2.13 jar is in {layout.libs}")
    layout.libs_marker.write_text(digest)


def _write_properties(layout: Layout) -> None:
    # Rewritten at every start so a change here reaches an existing installation. SCRAM needs
    # nothing at format time: its credentials live in the cluster's metadata, added later by
    # `floorguard kafka-user add` (AlterUserScramCredentials), so a storage formatted before the
    # SASL listener existed serves it as is.
    settings = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.voters": f"1@{HOST}:{LOCAL_KAFKA_CONTROLLER_PORT}",
        "listeners": (f"PLAINTEXT://{HOST}:{LOCAL_KAFKA_PORT},CONTROLLER://{HOST}:{LOCAL_KAFKA_CONTROLLER_PORT},"
                      f"SASL_PLAINTEXT://{HOST}:{LOCAL_KAFKA_SASL_PORT}"),  # fmt: skip
        "advertised.listeners": f"PLAINTEXT://{HOST}:{LOCAL_KAFKA_PORT},SASL_PLAINTEXT://{HOST}:{LOCAL_KAFKA_SASL_PORT}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT",
        "sasl.enabled.mechanisms": SASL_MECHANISM,
        f"listener.name.sasl_plaintext.{SASL_MECHANISM.lower()}.sasl.jaas.config": f"{SCRAM_LOGIN_MODULE} required;",
        "authorizer.class.name": AUTHORIZER_CLASS,
        "allow.everyone.if.no.acl.found": "false",
        "super.users": ";".join(SUPER_USERS),
        "log.dirs": str(layout.data),
        "offsets.topic.replication.factor": "1",
        "offsets.topic.num.partitions": "8",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        "group.initial.rebalance.delay.ms": "0",
        "auto.create.topics.enable": "false",
        "num.partitions": "8",
        "log.retention.check.interval.ms": "300000",
    }
    header = "# Generated by worker/stack/kafka.py at every start; edits here are overwritten.\n"
    layout.properties.write_text(header + "".join(f"{k}={v}\n" for k, v in settings.items()))


def _ensure_formatted(layout: Layout) -> None:
    """Format the storage once; the cluster id is kept so a wiped data folder rejoins the same id."""
    if (layout.data / "meta.properties").exists():
        return
    cluster_id = _read(layout.cluster_id_file) or _new_cluster_id(layout)
    _say(f"kafka: formatting storage in {_display(layout.data)} (cluster id {cluster_id})")
    _storage_tool(layout, "format", "-t", cluster_id, "-c", str(layout.properties))


def _new_cluster_id(layout: Layout) -> str:
    cluster_id = _storage_tool(layout, "random-uuid").strip().splitlines()[-1].strip()
    layout.cluster_id_file.write_text(cluster_id + "\n")
    return cluster_id


def _storage_tool(layout: Layout, *args: str) -> str:
    command = ["java", "-cp", _classpath(layout), f"-Dlog4j2.configurationFile={LOG4J_CONFIG_PATH}",
               f"-Dkafka.logs.dir={layout.root}", STORAGE_TOOL_CLASS, *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=STORAGE_TOOL_TIMEOUT_S)
    if done.returncode != 0:
        raise RuntimeError(f"kafka: StorageTool {args[0]} failed:\n{done.stdout}{done.stderr}")
    return done.stdout


# --- running ------------------------------------------------------------------------------


def _start(layout: Layout) -> None:
    log_offset = _size(layout.log)  # the log rolls across restarts: read only what this run writes
    command = [
        "java", *JVM_HEAP_OPTIONS,
        f"-Dlog4j2.configurationFile={LOG4J_CONFIG_PATH}", f"-Dkafka.logs.dir={layout.root}",
        "-cp", _classpath(layout), MAIN_CLASS, str(layout.properties),
    ]
    _say(f"kafka: starting on {LOCAL_KAFKA_BOOTSTRAP}")
    started_s = time.monotonic()
    with layout.console.open("wb") as console:
        process = subprocess.Popen(
            command, cwd=layout.root, stdin=subprocess.DEVNULL, stdout=console,
            stderr=subprocess.STDOUT, start_new_session=True,  # survives the caller; own group for down()
        )
    _CHILDREN[process.pid] = process
    layout.pid_file.write_text(f"{process.pid}\n")
    _wait_ready(layout, process.pid, log_offset)
    _say(f"kafka: ready in {time.monotonic() - started_s:.1f} s (pid {process.pid})")


def _wait_ready(layout: Layout, pid: int, log_offset: int) -> None:
    deadline = time.monotonic() + KAFKA_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if not _is_our_broker(pid, layout):
            layout.pid_file.unlink(missing_ok=True)
            raise RuntimeError(f"kafka: the broker exited during start-up\n{_tail(layout, log_offset)}")
        if READY_LINE in _read_from(layout.log, log_offset) and _port_open(LOCAL_KAFKA_PORT):
            return
        time.sleep(POLL_INTERVAL_S)
    raise RuntimeError(
        f"kafka: not ready after {KAFKA_START_TIMEOUT_S} s (pid {pid} left running; "
        f"`python -m worker.stack down` stops it)\n{_tail(layout, log_offset)}"
    )


def _wait_port_open(layout: Layout, pid: int) -> None:
    """A broker left starting by an interrupted up(): wait for its port rather than start another."""
    deadline = time.monotonic() + KAFKA_START_TIMEOUT_S
    while not _port_open(LOCAL_KAFKA_PORT):
        if time.monotonic() >= deadline or not _is_our_broker(pid, layout):
            raise RuntimeError(f"kafka: pid {pid} does not serve {LOCAL_KAFKA_BOOTSTRAP}\n{_tail(layout, 0)}")
        time.sleep(POLL_INTERVAL_S)


def _forget_stale_pid(layout: Layout) -> None:
    if layout.pid_file.exists():
        _say(f"kafka: removing stale pid file {_display(layout.pid_file)}")
        layout.pid_file.unlink(missing_ok=True)


def _refuse_foreign_listener() -> None:
    for port in (LOCAL_KAFKA_PORT, LOCAL_KAFKA_CONTROLLER_PORT, LOCAL_KAFKA_SASL_PORT):
        if _port_open(port):
            raise RuntimeError(
                f"kafka: port {HOST}:{port} is taken by a process this stack did not start; stop it and retry"
            )


def _signal_group(pid: int, signum: int) -> None:
    try:
        # start_new_session made the broker its group's leader; signal the group to reach any child.
        if os.getpgid(pid) == pid:
            os.killpg(pid, signum)
        else:
            os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _wait_exit(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while _alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_INTERVAL_S)
    return True


def _is_our_broker(pid: int, layout: Layout) -> bool:
    if not _alive(pid):
        return False
    if pid in _CHILDREN:
        return True  # started by this process: the handle is proof enough
    try:
        command_line = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return False
    except OSError:
        return True  # no /proc to check against: trust the pid file
    if not command_line:
        return True  # read in the midst of exec (the kernel fills it in last): alive is all we know
    args = command_line.split(b"\0")
    return MAIN_CLASS.encode() in args and str(layout.properties).encode() in args


def _alive(pid: int) -> bool:
    child = _CHILDREN.get(pid)
    if child is not None:
        if child.poll() is None:
            return True
        del _CHILDREN[pid]
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return _state(pid) != "Z"


def _state(pid: int) -> str:
    """The process state letter from /proc (Z for a zombie), or '' when unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[-1].split()[0]


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=TCP_CONNECT_TIMEOUT_S):
            return True
    except OSError:
        return False


# --- small helpers ------------------------------------------------------------------------


def _classpath(layout: Layout) -> str:
    return f"{layout.libs}/*"  # the JVM expands the wildcard, not a shell


def _stream(command: list[str], timeout_s: float, env: dict[str, str] | None = None) -> None:
    """Run a long command with its output on our stderr (fd 2), so stdout stays clean."""
    done = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=2, stderr=2, timeout=timeout_s, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"kafka: `{' '.join(command)}` failed with exit code {done.returncode}")


def _apt_env() -> dict[str, str]:
    return {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}


def _tail(layout: Layout, log_offset: int) -> str:
    log_lines = _read_from(layout.log, log_offset).splitlines()[-LOG_TAIL_LINES:]
    console_lines = _read_from(layout.console, 0).splitlines()[-LOG_TAIL_LINES:]
    return (
        f"--- last lines of {layout.log} ---\n" + "\n".join(log_lines)
        + f"\n--- last lines of {layout.console} ---\n" + "\n".join(console_lines)
    )


def _read_from(path: Path, offset: int) -> str:
    try:
        with path.open("rb") as f:
            if f.seek(0, os.SEEK_END) >= offset:  # smaller: log4j rolled it, the new file is all ours
                f.seek(offset)
            else:
                f.seek(0)
            return f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return ""


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _display(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
