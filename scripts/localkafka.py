#!/usr/bin/env python3
"""A real, local, single-node Apache Kafka (KRaft) for development, demos and tests.

Standard library only, so it runs before (and without) the project's venv.

The broker's classpath is fetched once from Maven Central with Maven (see
``scripts/kafka/pom.xml``) into ``<repo>/.cache/kafka-<version>/libs``, or into
``$NOTICE_RELAY_KAFKA_HOME/libs`` when that variable is set. Each data directory
holds one broker: its ``server.properties``, KRaft log dirs (``kraft/``), its
log (``server.log``), its JVM stdout/stderr (``broker.out``) and ``broker.pid``.

When ``KAFKA_BOOTSTRAP_SERVERS`` is set, nothing is started: :func:`start`
returns a handle on that cluster with ``owned=False`` and :func:`stop` leaves it
alone.

Library use (pytest fixture)::

    node = localkafka.start(tmp_path / "kafka")      # free ports, waits until usable
    try:
        ...  # aiokafka clients with bootstrap_servers=node.bootstrap
    finally:
        localkafka.stop(node)

Command line::

    python scripts/localkafka.py install
    python scripts/localkafka.py start [--data-dir DIR] [--port N] [--controller-port N]
    python scripts/localkafka.py status [--data-dir DIR]
    python scripts/localkafka.py stop [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import hashlib
import logging
import os
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DEFAULT_DATA_DIR",
    "KAFKA_VERSION",
    "KafkaError",
    "KafkaNode",
    "ensure_installed",
    "free_port",
    "running",
    "start",
    "stop",
]

KAFKA_VERSION = "4.0.2"
"""Broker version; must equal ``kafka.version`` in scripts/kafka/pom.xml."""

_SCRIPTS_DIR = Path(__file__).resolve().parent
_REPO_ROOT = _SCRIPTS_DIR.parent
_POM = _SCRIPTS_DIR / "kafka" / "pom.xml"
_LOG4J2_CONFIG = _SCRIPTS_DIR / "kafka" / "log4j2.xml"

DEFAULT_HOME = _REPO_ROOT / ".cache" / f"kafka-{KAFKA_VERSION}"
DEFAULT_DATA_DIR = _REPO_ROOT / ".cache" / "kafka-data"
DEFAULT_PORT = 9092
DEFAULT_CONTROLLER_PORT = 9093

HOME_ENV = "NOTICE_RELAY_KAFKA_HOME"
BOOTSTRAP_ENV = "KAFKA_BOOTSTRAP_SERVERS"
HEAP_ENV = "NOTICE_RELAY_KAFKA_HEAP_OPTS"
DEFAULT_HEAP_OPTS = "-Xmx512m -Xms256m"

# SerialGC: on a 2-core box a concurrent collector only competes with the
# broker's own threads, and with a <=512 MiB heap serial pauses are a few ms.
# ActiveProcessorCount=2 keeps JVM-sized pools (JIT, ForkJoin common pool)
# small on a big developer laptop too, so N brokers in a test run stay cheap.
_JVM_OPTS = (
    "-XX:+UseSerialGC",
    "-XX:ActiveProcessorCount=2",
    "-Djava.awt.headless=true",
)
# The storage tool lives for ~2 s: C1 only and a small heap start it fastest.
_TOOL_JVM_OPTS = ("-Xmx256m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1")

_MARKER = ".installed"
_KRAFT_DIR = "kraft"
_PID_FILE = "broker.pid"
_PROPERTIES_FILE = "server.properties"
_SERVER_LOG = "server.log"
_STDOUT_FILE = "broker.out"
_LOCK_FILE = ".lock"
_NODE_ID = 1
_HOST = "127.0.0.1"

log = logging.getLogger("localkafka")


class KafkaError(RuntimeError):
    """Installing, starting, probing or stopping the local broker failed."""


class _PortInUseError(KafkaError):
    """The broker died at startup because one of its ports was taken."""


@dataclass(frozen=True)
class KafkaNode:
    """A Kafka cluster to connect to.

    Attributes:
        bootstrap: ``host:port[,host:port...]`` for ``bootstrap_servers``.
        pid: PID of the broker JVM when this module runs it, else ``None``.
        data_dir: The node's data directory (meaningless when not owned).
        owned: True when this module started the broker and :func:`stop`
            should stop it; False for a cluster from ``KAFKA_BOOTSTRAP_SERVERS``.
    """

    bootstrap: str
    pid: int | None
    data_dir: Path
    owned: bool


# --------------------------------------------------------------------------- install


def _resolve_home(home: Path | None) -> Path:
    if home is not None:
        return Path(home).resolve()
    env = os.environ.get(HOME_ENV, "").strip()
    return Path(env).resolve() if env else DEFAULT_HOME


def _install_fingerprint() -> str:
    # Editing the pom (a version bump, an extra jar) must refetch the classpath.
    digest = hashlib.sha256(_POM.read_bytes())
    digest.update(KAFKA_VERSION.encode())
    return digest.hexdigest()


def _is_installed(home: Path, fingerprint: str) -> bool:
    marker = home / _MARKER
    try:
        return marker.read_text().strip() == fingerprint and (home / "libs").is_dir()
    except FileNotFoundError:
        return False


def ensure_installed(home: Path | None = None) -> Path:
    """Fetch the broker's classpath into ``<home>/libs`` once; return ``home``.

    ``home`` defaults to ``$NOTICE_RELAY_KAFKA_HOME`` or
    ``<repo>/.cache/kafka-<version>``. A marker file holding a hash of the pom
    makes later calls instant; concurrent callers serialise on a lock file.
    Maven uses its default local repository (``~/.m2``).

    Raises:
        KafkaError: Maven is missing or the fetch failed.
    """
    home = _resolve_home(home)
    fingerprint = _install_fingerprint()
    if _is_installed(home, fingerprint):
        return home
    home.mkdir(parents=True, exist_ok=True)
    with _locked(home / ".install.lock"):
        if _is_installed(home, fingerprint):  # another process did it meanwhile
            return home
        mvn = shutil.which("mvn")
        if mvn is None:
            raise KafkaError("Maven ('mvn') is not on PATH; it is needed once to fetch Kafka")
        # Fetch into a scratch dir and swap it in: copy-dependencies never
        # deletes, so refetching over an old libs/ would leave two versions of
        # the same jar on the classpath.
        staging = home / "libs.partial"
        shutil.rmtree(staging, ignore_errors=True)
        cmd = [
            mvn,
            "-q",
            "-B",
            "-f",
            str(_POM),
            f"-Dkafka.version={KAFKA_VERSION}",
            "dependency:copy-dependencies",
            "-DincludeScope=runtime",
            f"-DoutputDirectory={staging}",
        ]
        log.info("fetching Apache Kafka %s from Maven Central into %s", KAFKA_VERSION, home)
        result = subprocess.run(
            cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False
        )
        if result.returncode != 0 or not any(staging.glob("kafka_2.13-*.jar")):
            output = (result.stdout + result.stderr).strip().splitlines()
            raise KafkaError(
                f"fetching Kafka failed (exit {result.returncode}): {shlex.join(cmd)}\n"
                + "\n".join(output[-40:])
            )
        shutil.rmtree(home / "libs", ignore_errors=True)
        staging.rename(home / "libs")
        (home / _MARKER).write_text(fingerprint + "\n")
    return home


# --------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if needed)."""
    with path.open("a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        return int(sock.getsockname()[1])


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # The JVM binds with SO_REUSEADDR, so a port held only by TIME_WAIT
        # connections of a previous broker is free for it; match that.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((_HOST, port))
        except OSError:
            return False
        return True


def _java() -> str:
    java_home = os.environ.get("JAVA_HOME", "").strip()
    if java_home and (Path(java_home) / "bin" / "java").is_file():
        return str(Path(java_home) / "bin" / "java")
    java = shutil.which("java")
    if java is None:
        raise KafkaError("no 'java' on PATH and JAVA_HOME unset; Kafka 4.0 needs Java 17+")
    return java


def _classpath(home: Path) -> str:
    # The java launcher expands "dir/*" to every jar in dir itself.
    return str(home / "libs" / "*")


def _log_opts(data_dir: Path) -> list[str]:
    return [f"-Dlog4j2.configurationFile={_LOG4J2_CONFIG}", f"-Dkafka.logs.dir={data_dir}"]


LogMark = dict[str, int]
"""Sizes of the broker's log files before a launch: where that launch's output starts."""


def _log_mark(data_dir: Path) -> LogMark:
    mark: LogMark = {}
    for name in (_SERVER_LOG, _STDOUT_FILE):
        try:
            mark[name] = (data_dir / name).stat().st_size
        except FileNotFoundError:
            mark[name] = 0
    return mark


def _read_log(path: Path, offset: int | None, limit: int = 4 << 20) -> str:
    """Text of ``path`` from ``offset`` (the last 64 KiB when ``None``), at most ``limit`` bytes."""
    try:
        with path.open("rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            if offset is None or offset > size:  # None, or the log was rotated
                offset = max(0, size - (64 << 10))
            handle.seek(max(offset, size - limit))
            return handle.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


def _error_lines(text: str, limit: int = 20) -> list[str]:
    """ERROR/FATAL log lines with the ``Caused by:`` chain of their stack traces."""
    picked: list[str] = []
    after_error = False
    for line in text.splitlines():
        is_error = "] ERROR " in line or "] FATAL " in line
        # The line after an error is the exception itself when one is logged.
        exception = after_error and not line.startswith(("[", "\t"))
        if is_error or exception or line.startswith("Caused by:"):
            picked.append(line)
        after_error = is_error
    return picked[:limit]


def _diagnostics(data_dir: Path, mark: LogMark | None = None) -> str:
    """What the broker logged (since ``mark``): its errors first, then the tail.

    A failed start ends with hundreds of lines of orderly shutdown, so a plain
    tail would hide the cause (a bind error, a bad setting) far above it.
    """
    server_log = _read_log(data_dir / _SERVER_LOG, None if mark is None else mark[_SERVER_LOG])
    stdout = _read_log(data_dir / _STDOUT_FILE, None if mark is None else mark[_STDOUT_FILE])
    parts = []
    errors = _error_lines(server_log)
    if errors:
        parts.append(f"--- errors in {data_dir / _SERVER_LOG} ---\n" + "\n".join(errors))
    tail = "\n".join(server_log.splitlines()[-15:]) or "(empty)"
    parts.append(f"--- tail of {data_dir / _SERVER_LOG} ---\n{tail}")
    if stdout.strip():
        parts.append(
            f"--- {data_dir / _STDOUT_FILE} (JVM output) ---\n"
            + "\n".join(stdout.splitlines()[-15:])
        )
    return "\n" + "\n".join(parts)


def _new_cluster_id() -> str:
    """A random Kafka cluster id: 16 random bytes as unpadded URL-safe base64."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        # Kafka's Uuid.randomUuid() rejects ids starting with '-' too: the
        # CLI tools would read them as options.
        if not cluster_id.startswith("-"):
            return cluster_id


def _read_properties(path: Path) -> dict[str, str]:
    """Parse the simple ``key=value`` files Kafka writes (no continuations)."""
    props: dict[str, str] = {}
    try:
        text = path.read_text()
    except FileNotFoundError:
        return props
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith(("#", "!")) and "=" in line:
            key, _, value = line.partition("=")
            props[key.strip()] = value.strip()
    return props


# --------------------------------------------------------------------------- process


def _pid_alive(pid: int) -> bool:
    """True if ``pid`` runs and is not a zombie (reaping it if it is our child)."""
    try:
        reaped, _ = os.waitpid(pid, os.WNOHANG)
        if reaped == pid:
            return False
    except ChildProcessError:
        pass  # not our child: the normal case, the launcher shell has exited
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs: trust kill(0)
    # An orphan killed by us stays a zombie until PID 1 reaps it, and some
    # container inits never do; a zombie broker is a stopped broker.
    state = stat.rpartition(")")[2].split()[0]
    return state not in ("Z", "X")


def _is_our_broker(pid: int, data_dir: Path) -> bool:
    """True if ``pid`` is alive and is the broker JVM of ``data_dir``.

    Guards against PID reuse: a stale pid file must never make us signal (or
    report as Kafka) some unrelated process that got the same PID.
    """
    if not _pid_alive(pid):
        return False
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except FileNotFoundError:
        return False
    except OSError:
        return True  # no procfs: trust the pid file
    props = str(data_dir / _PROPERTIES_FILE).encode()
    return b"kafka.Kafka" in argv and props in argv


def _read_pid(data_dir: Path) -> int | None:
    try:
        return int((data_dir / _PID_FILE).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def _node_from_pid_file(data_dir: Path) -> KafkaNode | None:
    """The broker recorded in ``data_dir`` if its process is alive (port not checked)."""
    pid = _read_pid(data_dir)
    if pid is None or not _is_our_broker(pid, data_dir):
        return None
    props = _read_properties(data_dir / _PROPERTIES_FILE)
    advertised = props.get("advertised.listeners", "")
    bootstrap = advertised.removeprefix("PLAINTEXT://")
    if not bootstrap:
        return None
    return KafkaNode(bootstrap=bootstrap, pid=pid, data_dir=data_dir, owned=True)


def _launch_detached(argv: list[str], out_file: Path) -> int:
    """Start ``argv`` in its own session, reparented away from us; return its PID.

    A small ``sh`` starts the JVM in the background and exits, so the broker
    is not our child: no zombie to reap, no ``ResourceWarning`` from a
    ``Popen`` object dropped while its process lives (pytest runs with
    warnings as errors), and the broker outlives the CLI that started it.
    """
    script = 'out=$1; shift; "$@" </dev/null >>"$out" 2>&1 & echo $!'
    result = subprocess.run(
        ["/bin/sh", "-c", script, "sh", str(out_file), *argv],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=True,
        close_fds=True,  # the data-dir lock fd must not leak into the JVM
        start_new_session=True,
    )
    return int(result.stdout.strip())


# --------------------------------------------------------------------------- protocol


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(size - len(chunks))
        if not chunk:
            raise ConnectionError("connection closed by broker")
        chunks += chunk
    return bytes(chunks)


def _request(
    sock: socket.socket, api_key: int, version: int, correlation_id: int, body: bytes
) -> bytes:
    """Send one request with a v1 (non-flexible) header; return the response body."""
    client_id = b"localkafka"
    header = struct.pack(">hhih", api_key, version, correlation_id, len(client_id)) + client_id
    payload = header + body
    sock.sendall(struct.pack(">i", len(payload)) + payload)
    (size,) = struct.unpack(">i", _recv_exact(sock, 4))
    response = _recv_exact(sock, size)
    (got_id,) = struct.unpack_from(">i", response)
    if got_id != correlation_id:
        raise ConnectionError(f"correlation id {got_id} != {correlation_id}")
    return response[4:]


def _probe(port: int, timeout: float = 3.0) -> str | None:
    """Check that a Kafka broker on 127.0.0.1:``port`` serves clients.

    Sends ApiVersions v0, then Metadata v4 (the oldest version Kafka 4.0
    still accepts, KIP-896), and requires at least one registered broker: a
    KRaft broker answers ApiVersions before it has caught up with the
    metadata log, but lists brokers only once it is unfenced and usable.

    Returns:
        The cluster id reported by the broker.

    Raises:
        OSError: Nothing usable answered (not up yet, or not Kafka).
    """
    with socket.create_connection((_HOST, port), timeout=timeout) as sock:
        body = _request(sock, api_key=18, version=0, correlation_id=1, body=b"")
        (error_code, count) = struct.unpack_from(">hi", body)
        if error_code != 0:
            raise ConnectionError(f"ApiVersions error {error_code}")
        entries = (struct.unpack_from(">hhh", body, 6 + 6 * i) for i in range(count))
        versions = {key: (low, high) for key, low, high in entries}
        low, high = versions.get(3, (0, -1))
        if not low <= 4 <= high:
            raise ConnectionError(f"broker does not serve Metadata v4 (has v{low}-v{high})")
        # topics=[] (none; null would mean all), allow_auto_topic_creation=false
        body = _request(sock, api_key=3, version=4, correlation_id=2, body=struct.pack(">ib", 0, 0))
        offset = 4  # throttle_time_ms
        (broker_count,) = struct.unpack_from(">i", body, offset)
        offset += 4
        if broker_count < 1:
            raise ConnectionError("broker lists no brokers yet")
        for _ in range(broker_count):
            offset += 4  # node_id
            (host_len,) = struct.unpack_from(">h", body, offset)
            offset += 2 + host_len + 4  # host, port
            (rack_len,) = struct.unpack_from(">h", body, offset)
            offset += 2 + max(rack_len, 0)
        (id_len,) = struct.unpack_from(">h", body, offset)
        offset += 2
        return body[offset : offset + id_len].decode() if id_len >= 0 else ""


def _wait_ready(
    port: int,
    data_dir: Path,
    pid: int | None,
    cluster_id: str | None,
    timeout: float,
    mark: LogMark | None = None,
) -> None:
    """Poll until the broker serves clients; fail fast if its process dies.

    Matching the cluster id ensures we reached *this* broker, not another
    Kafka that already sat on the port.
    """
    deadline = time.monotonic() + timeout
    last_error = "no attempt"
    while True:
        if pid is not None and not _is_our_broker(pid, data_dir):
            diagnostics = _diagnostics(data_dir, mark)
            error_type = _PortInUseError if "Address already in use" in diagnostics else KafkaError
            raise error_type(f"Kafka broker (pid {pid}) exited during startup{diagnostics}")
        try:
            served_id = _probe(port)
        except (OSError, struct.error) as exc:  # struct.error: truncated/foreign reply
            last_error = f"{type(exc).__name__}: {exc}"
        else:
            if cluster_id is None or served_id == cluster_id:
                return
            last_error = f"port {port} serves cluster {served_id!r}, expected {cluster_id!r}"
        if time.monotonic() >= deadline:
            raise KafkaError(
                f"Kafka on {_HOST}:{port} not usable after {timeout:g} s "
                f"(last probe: {last_error}){_diagnostics(data_dir, mark)}"
            )
        time.sleep(0.2)


# --------------------------------------------------------------------------- broker


def _write_properties(data_dir: Path, port: int, controller_port: int) -> Path:
    kraft_dir = data_dir / _KRAFT_DIR
    settings = {
        "process.roles": "broker,controller",
        "node.id": str(_NODE_ID),
        # Static voters (not --standalone's dynamic quorum): the voter's
        # endpoint then lives in this file, not in the formatted log, so a
        # data dir can be restarted on other ports.
        "controller.quorum.voters": f"{_NODE_ID}@{_HOST}:{controller_port}",
        "listeners": f"PLAINTEXT://{_HOST}:{port},CONTROLLER://{_HOST}:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://{_HOST}:{port}",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "inter.broker.listener.name": "PLAINTEXT",
        "controller.listener.names": "CONTROLLER",
        "log.dirs": str(kraft_dir),
        # One node: every internal topic must have replication factor 1.
        "num.partitions": "1",
        "default.replication.factor": "1",
        "min.insync.replicas": "1",
        "offsets.topic.replication.factor": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        # Faust creates its internal (changelog, repartition) topics on the fly.
        "auto.create.topics.enable": "true",
        # A lone consumer should not wait 3 s for hypothetical group peers.
        "group.initial.rebalance.delay.ms": "0",
        # After a restart the controller gives the previous incarnation of
        # broker 1 a fresh session, and the new one is refused
        # (DUPLICATE_BROKER_REGISTRATION) until that session times out: with
        # the defaults (9 s, retried every 2 s) restarting a data dir took
        # ~12 s. Broker and controller share one JVM here, so heartbeats
        # never cross a network; 4 s still rides out any GC pause of a 512 MiB heap.
        "broker.session.timeout.ms": "4000",
        "broker.heartbeat.interval.ms": "500",
        # Defaults (3 network, 8 I/O threads) are sized for servers.
        "num.network.threads": "2",
        "num.io.threads": "4",
    }
    text = "# Written by scripts/localkafka.py at every start; edits are lost.\n"
    text += "".join(f"{key}={value}\n" for key, value in settings.items())
    path = data_dir / _PROPERTIES_FILE
    path.write_text(text)
    return path


def _format_storage(home: Path, data_dir: Path, properties: Path) -> str:
    """Format the KRaft log dir unless already done; return its cluster id."""
    meta = data_dir / _KRAFT_DIR / "meta.properties"
    cluster_id = _read_properties(meta).get("cluster.id")
    if cluster_id:
        return cluster_id
    cluster_id = _new_cluster_id()
    cmd = [
        _java(), *_TOOL_JVM_OPTS, *_log_opts(data_dir), "-cp", _classpath(home),
        "kafka.tools.StorageTool", "format", "--ignore-formatted",
        "-t", cluster_id, "-c", str(properties),
    ]  # fmt: skip
    result = subprocess.run(
        cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise KafkaError(
            f"formatting {data_dir / _KRAFT_DIR} failed (exit {result.returncode}):\n"
            f"{result.stdout}{result.stderr}{_diagnostics(data_dir)}"
        )
    return _read_properties(meta).get("cluster.id") or cluster_id


def _heap_opts() -> list[str]:
    return shlex.split(os.environ.get(HEAP_ENV, "").strip() or DEFAULT_HEAP_OPTS)


def _launch(home: Path, data_dir: Path, port: int, controller_port: int) -> tuple[int, str]:
    """Write the config, format if needed, start the JVM; return (pid, cluster id)."""
    properties = _write_properties(data_dir, port, controller_port)
    cluster_id = _format_storage(home, data_dir, properties)
    argv = [
        _java(), *_heap_opts(), *_JVM_OPTS, *_log_opts(data_dir),
        "-cp", _classpath(home), "kafka.Kafka", str(properties),
    ]  # fmt: skip
    pid = _launch_detached(argv, data_dir / _STDOUT_FILE)
    (data_dir / _PID_FILE).write_text(f"{pid}\n")
    log.info("started Kafka pid %d on %s:%d (controller %d)", pid, _HOST, port, controller_port)
    return pid, cluster_id


def _external_node(data_dir: Path) -> KafkaNode | None:
    bootstrap = os.environ.get(BOOTSTRAP_ENV, "").strip()
    if not bootstrap:
        return None
    return KafkaNode(bootstrap=bootstrap, pid=None, data_dir=data_dir, owned=False)


def running(data_dir: Path = DEFAULT_DATA_DIR) -> KafkaNode | None:
    """The broker of ``data_dir`` if its process is alive and it serves clients.

    With ``KAFKA_BOOTSTRAP_SERVERS`` set, returns that (unprobed) cluster.
    """
    data_dir = Path(data_dir).resolve()
    external = _external_node(data_dir)
    if external is not None:
        return external
    node = _node_from_pid_file(data_dir)
    if node is None:
        return None
    try:
        _probe(_port_of(node))
    except (OSError, struct.error):
        return None
    return node


def _port_of(node: KafkaNode) -> int:
    return int(node.bootstrap.split(",")[0].rpartition(":")[2])


def start(
    data_dir: Path,
    port: int | None = None,
    controller_port: int | None = None,
    timeout: float = 90,
) -> KafkaNode:
    """Start (or reuse) the single-node KRaft broker of ``data_dir``; wait until usable.

    Installs Kafka first if needed, formats ``data_dir`` on first use (topics
    survive a stop/start), and returns once a Metadata request lists the
    broker. If this data dir's broker already runs, returns it. Ports left as
    ``None`` are picked free (and re-picked if another process grabs one
    first). With ``KAFKA_BOOTSTRAP_SERVERS`` set, starts nothing and returns
    that cluster with ``owned=False``.

    Raises:
        KafkaError: A port is taken, the already-running broker uses other
            ports than requested, or the broker is not usable within
            ``timeout`` seconds, or dies while starting (the message then
            carries the ERROR lines and the tail of this start's server.log).
    """
    data_dir = Path(data_dir).resolve()
    external = _external_node(data_dir)
    if external is not None:
        return external
    home = ensure_installed()
    data_dir.mkdir(parents=True, exist_ok=True)
    # Serialises concurrent start/stop of one data dir (e.g. pytest-xdist
    # workers sharing it): the second caller waits, then reuses the broker.
    with _locked(data_dir / _LOCK_FILE):
        existing = _node_from_pid_file(data_dir)
        if existing is not None:
            current = _read_properties(data_dir / _PROPERTIES_FILE)
            wanted = {"advertised.listeners": port, "controller.quorum.voters": controller_port}
            for key, value in wanted.items():
                if value is not None and not current.get(key, "").endswith(f":{value}"):
                    raise KafkaError(
                        f"the broker of {data_dir} already runs with {key}="
                        f"{current.get(key)}; stop it to change ports"
                    )
            meta = _read_properties(data_dir / _KRAFT_DIR / "meta.properties")
            _wait_ready(_port_of(existing), data_dir, existing.pid, meta.get("cluster.id"), timeout)
            return existing
        (data_dir / _PID_FILE).unlink(missing_ok=True)  # stale
        for requested in (port, controller_port):
            if requested is not None and not _port_is_free(requested):
                raise KafkaError(f"port {requested} on {_HOST} is already in use")

        attempts = 1 if port is not None and controller_port is not None else 3
        for attempt in range(1, attempts + 1):
            chosen_port = port if port is not None else free_port()
            chosen_controller = controller_port
            while chosen_controller is None or chosen_controller == chosen_port:
                chosen_controller = free_port()
            started = time.monotonic()
            mark = _log_mark(data_dir)
            pid, cluster_id = _launch(home, data_dir, chosen_port, chosen_controller)
            node = KafkaNode(f"{_HOST}:{chosen_port}", pid, data_dir, owned=True)
            try:
                _wait_ready(chosen_port, data_dir, pid, cluster_id, timeout, mark)
            except _PortInUseError:
                _terminate(pid, data_dir)
                if attempt == attempts:
                    raise
                log.info("a port was taken meanwhile; retrying with others")
                continue
            except BaseException:
                # Includes Ctrl-C: never leave a half-started broker behind.
                _terminate(pid, data_dir)
                raise
            log.info("Kafka usable after %.1fs at %s", time.monotonic() - started, node.bootstrap)
            return node
    raise AssertionError("unreachable")


def _signal_and_wait(pid: int, sig: signal.Signals, timeout: float) -> bool:
    """Send ``sig`` to ``pid``; return True once it is gone, False after ``timeout``."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    deadline = time.monotonic() + timeout
    while _pid_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def _terminate(pid: int, data_dir: Path, timeout: float = 20) -> None:
    """SIGTERM the broker (a clean controlled shutdown), SIGKILL after ``timeout``."""
    if _is_our_broker(pid, data_dir) and not _signal_and_wait(pid, signal.SIGTERM, timeout):
        log.warning("Kafka pid %d ignored SIGTERM for %.0f s; killing it", pid, timeout)
        if not _signal_and_wait(pid, signal.SIGKILL, 5.0):
            raise KafkaError(f"Kafka pid {pid} survived SIGKILL")
    if _read_pid(data_dir) == pid:
        (data_dir / _PID_FILE).unlink(missing_ok=True)


def stop(node: KafkaNode) -> None:
    """Stop a broker that :func:`start` launched; a no-op for ``owned=False``.

    Signals only the PID recorded for this data dir, after checking it still is
    that broker (SIGTERM, then SIGKILL after 20 s). Data is kept.
    """
    if not node.owned or node.pid is None:
        return
    data_dir = Path(node.data_dir).resolve()
    if not data_dir.is_dir():
        return
    with _locked(data_dir / _LOCK_FILE):
        _terminate(node.pid, data_dir)


# --------------------------------------------------------------------------- CLI


def _cli_start(
    data_dir: Path, port: int | None, controller_port: int | None, timeout: float
) -> int:
    node = running(data_dir)
    # Reuse a running broker unless ports were asked for (start() then checks
    # they match); otherwise the CLI's fixed defaults apply.
    if node is None or port is not None or controller_port is not None:
        port = DEFAULT_PORT if port is None else port
        if controller_port is None:
            controller_port = DEFAULT_CONTROLLER_PORT if port == DEFAULT_PORT else port + 1
        node = start(data_dir, port, controller_port, timeout=timeout)
    print(node.bootstrap)
    return 0


def _cli_status(data_dir: Path) -> int:
    node = running(data_dir)
    if node is None:
        print("not running")
        return 1
    print(f"{node.bootstrap} pid {node.pid}" if node.owned else f"{node.bootstrap} (external)")
    return 0


def _cli_stop(data_dir: Path) -> int:
    if _external_node(data_dir) is not None:
        log.info("%s is set: not stopping an external cluster", BOOTSTRAP_ENV)
        return 0
    # By the pid file alone (no probe), so a broker that stopped answering
    # can still be stopped.
    node = _node_from_pid_file(data_dir)
    if node is None:
        (data_dir / _PID_FILE).unlink(missing_ok=True)
        print("not running")
        return 0
    stop(node)
    print(f"stopped pid {node.pid}")
    return 0


def _main(argv: list[str] | None = None) -> int:
    """Run the CLI; return the process exit status."""
    parser = argparse.ArgumentParser(
        prog="localkafka.py",
        description=f"A local single-node Apache Kafka {KAFKA_VERSION} (KRaft) for development.",
        epilog=f"With {BOOTSTRAP_ENV} set, start/status/stop use that cluster and start nothing.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("install", help="fetch Kafka from Maven Central (once)")
    for name, text in (
        ("start", "start the broker (or reuse the running one); print its bootstrap"),
        ("status", "print the bootstrap if running; exit 1 if not"),
        ("stop", "stop the broker of the data dir"),
    ):
        command = commands.add_parser(name, help=text)
        command.add_argument(
            "--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="default: %(default)s"
        )
        if name == "start":
            command.add_argument(
                "--port", type=int, help=f"client (PLAINTEXT) port, default {DEFAULT_PORT}"
            )
            command.add_argument(
                "--controller-port",
                type=int,
                help=f"default {DEFAULT_CONTROLLER_PORT}, or PORT+1 with --port",
            )
            command.add_argument(
                "--timeout", type=float, default=90.0, help="seconds to wait, default %(default)s"
            )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="localkafka: %(message)s", stream=sys.stderr)

    try:
        if args.command == "install":
            print(ensure_installed())
            return 0
        data_dir: Path = args.data_dir.resolve()
        if args.command == "start":
            return _cli_start(data_dir, args.port, args.controller_port, args.timeout)
        if args.command == "status":
            return _cli_status(data_dir)
        return _cli_stop(data_dir)
    except KafkaError as exc:
        print(f"localkafka: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(_main())
