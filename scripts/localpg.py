#!/usr/bin/env python3
"""A real, local PostgreSQL server for development and tests.

Standard library only, so it runs before (and without) the project's venv.

The server binaries come from Debian's ``postgresql`` package
(``/usr/lib/postgresql/<version>/bin``); when none is found, :func:`ensure_installed`
installs that package with ``apt-get`` (as root, or through ``sudo -n``). Any other
installation is used when ``NOTICE_RELAY_PG_BINDIR`` names its ``bin`` directory, or
when ``pg_ctl`` and ``initdb`` are on ``PATH``.

Each data directory holds one server::

    DATA_DIR/
      cluster/        the cluster (initdb), with localpg.conf written at every start
      run/            its unix socket
      postgres.log    the server's log
      localpg.json    port, user, password and database of the server
      .lock           serialises start/stop of this data dir

The server listens on 127.0.0.1 only (a free port unless one is asked for) and on a
unix socket inside the data dir. Local-socket connections are trusted (only the
server's own account and root can reach the socket: the data dir is private); TCP
connections need a password (SCRAM). The server is created with one login role and one
database, both ``notice_relay``, the role with a random password and ``CREATEDB`` (the
tests give each test its own database). Durability is switched off (``fsync``,
``synchronous_commit``, ``full_page_writes``): this is a server for tests and
development, never for data anyone needs.

PostgreSQL refuses to run as root. Run as root (a CI container), the server runs as the
``postgres`` account the Debian package creates (through ``runuser``) and the data dir
is made its own, so it must lie where that account can reach it (``/tmp``, the repo;
not a private directory such as pytest's ``tmp_path``). Run as anyone else, the server
runs as that user.

When ``NOTICE_RELAY_TEST_POSTGRES_URL`` is set, nothing is installed or started:
:func:`start` returns that server with ``owned=False`` and :func:`stop` leaves it alone.
Its user needs ``CREATEDB`` for the tests.

Library use (pytest fixture)::

    server = localpg.start(data_dir)          # free port, waits until it accepts connections
    try:
        ...  # AuditStore.open(server.url)
    finally:
        localpg.stop(server)

Command line::

    python scripts/localpg.py install
    python scripts/localpg.py start [--data-dir DIR] [--port N]   # prints the URL
    python scripts/localpg.py status [--data-dir DIR]
    python scripts/localpg.py stop [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

__all__ = [
    "DEFAULT_DATA_DIR",
    "URL_ENV",
    "PgError",
    "PgServer",
    "ensure_installed",
    "find_bindir",
    "free_port",
    "running",
    "start",
    "stop",
]

_SCRIPTS_DIR = Path(__file__).resolve().parent
_REPO_ROOT = _SCRIPTS_DIR.parent

DEFAULT_DATA_DIR = _REPO_ROOT / ".cache" / "pg-data"
DEFAULT_PORT = 55432
"""The command line's port when none was asked for or used before (not 5432, which a
system PostgreSQL may hold)."""

URL_ENV = "NOTICE_RELAY_TEST_POSTGRES_URL"
BINDIR_ENV = "NOTICE_RELAY_PG_BINDIR"

DATABASE = "notice_relay"
USER = "notice_relay"
SUPERUSER = "postgres"
SERVER_ACCOUNT = "postgres"
"""The account the server runs as when we are root (created by Debian's package)."""

_DEBIAN_ROOT = Path("/usr/lib/postgresql")
_TOOLS = ("initdb", "pg_ctl", "postgres", "psql", "pg_isready")
_CLUSTER = "cluster"
_SOCKETS = "run"
_LOG = "postgres.log"
_STATE = "localpg.json"
_LOCK = ".lock"
_CONF = "localpg.conf"
_HOST = "127.0.0.1"
# sun_path is 108 bytes with its NUL; PostgreSQL refuses longer socket paths.
_MAX_SOCKET_PATH = 107

log = logging.getLogger("localpg")


class PgError(RuntimeError):
    """Installing, starting, probing or stopping the local server failed."""


class _PortInUseError(PgError):
    """The server exited at startup because its port was taken."""


@dataclass(frozen=True)
class PgServer:
    """A PostgreSQL server to connect to.

    Attributes:
        host, port, user, password, database: where and as whom to connect.
        pid: PID of the postmaster when this module runs it, else ``None``.
        data_dir: The server's data directory (meaningless when not owned).
        owned: True when this module started the server and :func:`stop` should
            stop it; False for a server from ``NOTICE_RELAY_TEST_POSTGRES_URL``.
    """

    host: str
    port: int
    user: str
    password: str
    database: str
    pid: int | None
    data_dir: Path
    owned: bool

    def url_for(self, database: str, *, driver: str = "postgresql+asyncpg") -> str:
        """The URL of ``database`` on this server (SQLAlchemy form by default)."""
        auth = quote(self.user, safe="")
        if self.password:
            auth += ":" + quote(self.password, safe="")
        return f"{driver}://{auth}@{self.host}:{self.port}/{quote(database, safe='')}"

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the server's database (``postgresql+asyncpg://…``)."""
        return self.url_for(self.database)

    @property
    def dsn(self) -> str:
        """libpq/asyncpg URL of the server's database (``postgresql://…``)."""
        return self.url_for(self.database, driver="postgresql")


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
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((_HOST, port))
        except OSError:
            return False
        return True


def _pid_alive(pid: int) -> bool:
    """True if ``pid`` runs and is not a zombie (reaping it if it is our child)."""
    try:
        reaped, _ = os.waitpid(pid, os.WNOHANG)
        if reaped == pid:
            return False
    except ChildProcessError:
        pass  # not our child: the normal case, pg_ctl has exited
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
    # Some container inits never reap orphans; a zombie postmaster is a stopped one.
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def _tool_env() -> dict[str, str]:
    """Our environment without libpq's variables (they would redirect pg_ctl and psql
    to another server) and with untranslated messages (we read some of them)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


def _server_account() -> str | None:
    """The account to run server tools as: ``postgres`` when we are root, else None
    (ourselves)."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(SERVER_ACCOUNT)
    except KeyError:
        raise PgError(
            f"running as root, and PostgreSQL refuses to run as root; the {SERVER_ACCOUNT!r} "
            "account (created by Debian's postgresql package) does not exist"
        ) from None
    return SERVER_ACCOUNT


def _as(account: str | None, argv: list[str]) -> list[str]:
    if account is None:
        return argv
    runuser = shutil.which("runuser") or next(
        (p for p in ("/usr/sbin/runuser", "/sbin/runuser") if Path(p).exists()), None
    )
    if runuser is None:
        raise PgError("running as root but 'runuser' (util-linux) is missing")
    return [runuser, "-u", account, "--", *argv]


def _run(
    argv: list[str],
    *,
    account: str | None = None,
    cwd: Path | None = None,
    input: str | None = None,
    timeout: float = 120,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run a tool (as ``account``); raise :class:`PgError` with its output if it fails."""
    cmd = _as(account, argv)
    try:
        result = subprocess.run(
            cmd,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            cwd=cwd or "/",
            env=_tool_env(),
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise PgError(f"{' '.join(argv[:2])} did not finish in {timeout:g} s") from exc
    if check and result.returncode != 0:
        output = (result.stdout + result.stderr).strip().splitlines()
        raise PgError(
            f"{' '.join(cmd)} failed (exit {result.returncode}):\n" + "\n".join(output[-30:])
        )
    return result


# --------------------------------------------------------------------------- install


def _has_tools(bindir: Path) -> bool:
    return all(os.access(bindir / tool, os.X_OK) for tool in _TOOLS)


def _version_key(bindir: Path) -> tuple[int, ...]:
    # /usr/lib/postgresql/15/bin -> (15,); the newest installed version wins.
    return tuple(int(x) for x in re.findall(r"\d+", bindir.parent.name)) or (0,)


def find_bindir() -> Path | None:
    """The directory of ``initdb``, ``pg_ctl`` and friends, or None when none is found.

    ``$NOTICE_RELAY_PG_BINDIR`` when set; else the newest Debian installation under
    ``/usr/lib/postgresql``; else the directory of ``pg_ctl`` on ``PATH``.
    """
    configured = os.environ.get(BINDIR_ENV, "").strip()
    if configured:
        return Path(configured) if _has_tools(Path(configured)) else None
    found = sorted(
        (p for p in _DEBIAN_ROOT.glob("*/bin") if _has_tools(p)), key=_version_key, reverse=True
    )
    if found:
        return found[0]
    on_path = shutil.which("pg_ctl")
    if on_path:
        for candidate in (Path(on_path).parent, Path(on_path).resolve().parent):
            if _has_tools(candidate):
                return candidate
    return None


def _apt_install(packages: list[str]) -> None:
    apt = shutil.which("apt-get")
    if apt is None:
        raise PgError(
            "PostgreSQL (initdb, pg_ctl) is not installed and there is no apt-get to install "
            f"it: install it and set {BINDIR_ENV}, or point {URL_ENV} at a server"
        )
    if os.geteuid() == 0:
        prefix: list[str] = []
    elif shutil.which("sudo"):
        prefix = ["sudo", "-n"]
    else:
        raise PgError(
            f"PostgreSQL is not installed; as root, run: apt-get install {' '.join(packages)}"
        )
    env_argv = ["env", "DEBIAN_FRONTEND=noninteractive", apt]
    log.info("installing %s from Debian's packages", " ".join(packages))
    started = time.monotonic()
    _run([*prefix, *env_argv, "update", "-qq"], timeout=600)
    _run([*prefix, *env_argv, "install", "-y", "-qq", "--no-install-recommends", *packages],
         timeout=1200)
    log.info("installed %s in %.0f s", " ".join(packages), time.monotonic() - started)


def ensure_installed() -> Path:
    """Return the PostgreSQL bin directory, installing Debian's ``postgresql`` first
    when no ``initdb``/``pg_ctl`` is found.

    Raises:
        PgError: ``NOTICE_RELAY_PG_BINDIR`` names a directory without the tools, or
            installing is impossible (no apt-get, not root and no sudo) or failed.
    """
    bindir = find_bindir()
    if bindir is not None:
        return bindir
    configured = os.environ.get(BINDIR_ENV, "").strip()
    if configured:
        raise PgError(f"{BINDIR_ENV}={configured} lacks one of {', '.join(_TOOLS)}")
    lock_dir = _REPO_ROOT / ".cache"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with _locked(lock_dir / "localpg-install.lock"):
        if find_bindir() is None:  # another process may have installed it meanwhile
            _apt_install(["postgresql"])
    bindir = find_bindir()
    if bindir is None:
        raise PgError(f"installed postgresql, but found no {', '.join(_TOOLS)} in "
                      f"{_DEBIAN_ROOT}/*/bin")
    return bindir


# --------------------------------------------------------------------------- external


def _parse_url(url: str) -> PgServer:
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("postgres", "postgresql", "postgresql+asyncpg"):
        raise PgError(f"{URL_ENV} must be a postgresql:// URL, not {url!r}")
    parts = urlsplit("postgresql://" + rest)
    return PgServer(
        host=parts.hostname or _HOST,
        port=parts.port or 5432,
        user=unquote(parts.username or ""),
        password=unquote(parts.password or ""),
        database=unquote(parts.path.lstrip("/")) or "postgres",
        pid=None,
        data_dir=Path(),
        owned=False,
    )


def _external() -> PgServer | None:
    url = os.environ.get(URL_ENV, "").strip()
    return _parse_url(url) if url else None


# --------------------------------------------------------------------------- state


def _read_state(data_dir: Path) -> dict[str, object]:
    try:
        state = json.loads((data_dir / _STATE).read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def _write_state(data_dir: Path, state: dict[str, object]) -> None:
    tmp = data_dir / (_STATE + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(state, handle, indent=2)
    tmp.replace(data_dir / _STATE)


def _postmaster_info(cluster: Path) -> tuple[int, int] | None:
    """(pid, port) from the cluster's ``postmaster.pid``, if it has one."""
    try:
        lines = (cluster / "postmaster.pid").read_text().splitlines()
        return int(lines[0]), int(lines[3])
    except (FileNotFoundError, IndexError, ValueError):
        return None


def _is_our_postmaster(pid: int, cluster: Path) -> bool:
    """True if ``pid`` is alive and is the postmaster of ``cluster``.

    Guards against PID reuse: a stale ``postmaster.pid`` must never make us signal
    (or report as PostgreSQL) an unrelated process. The postmaster's working
    directory is its data directory.
    """
    if not _pid_alive(pid):
        return False
    try:
        return Path(os.readlink(f"/proc/{pid}/cwd")) == cluster.resolve()
    except FileNotFoundError:
        return False
    except OSError:
        return True  # no procfs, or not allowed to look: trust the pid file


def _server_from(data_dir: Path, pid: int, port: int) -> PgServer | None:
    state = _read_state(data_dir)
    password = state.get("password")
    if not isinstance(password, str):
        return None
    return PgServer(host=_HOST, port=port, user=str(state.get("user", USER)), password=password,
                    database=str(state.get("database", DATABASE)), pid=pid, data_dir=data_dir,
                    owned=True)


# --------------------------------------------------------------------------- server


def _prepare(data_dir: Path, account: str | None) -> None:
    """Create the data dir and its socket dir, owned by the server's account."""
    data_dir.mkdir(parents=True, exist_ok=True)
    sockets = data_dir / _SOCKETS
    sockets.mkdir(exist_ok=True)
    for path in (data_dir, sockets):
        if account is not None:
            shutil.chown(path, account, account)
        path.chmod(0o700)
    if account is not None:
        probe = _run(["test", "-w", str(sockets)], account=account, check=False)
        if probe.returncode != 0:
            raise PgError(
                f"the {account!r} account cannot reach {data_dir}: a parent directory is "
                f"private. PostgreSQL refuses to run as root, so it runs as {account!r}; "
                "use a data dir that account can reach (under /tmp or the repository)"
            )


def _initdb(bindir: Path, data_dir: Path, account: str | None) -> None:
    cluster = data_dir / _CLUSTER
    if (cluster / "PG_VERSION").exists():
        return
    log.info("initdb %s", cluster)
    _run(
        [str(bindir / "initdb"), "-D", str(cluster), "-U", SUPERUSER, "--auth-local=trust",
         "--auth-host=scram-sha-256", "-E", "UTF8", "--no-locale", "--no-sync",
         "--no-instructions"],
        account=account, cwd=data_dir,
    )  # fmt: skip
    with (cluster / "postgresql.conf").open("a") as conf:
        conf.write(f"\n# Added by scripts/localpg.py\ninclude_if_exists = '{_CONF}'\n")


def _ensure_state(data_dir: Path) -> None:
    """Pick the role's password once; it is kept across restarts."""
    state = _read_state(data_dir)
    if not isinstance(state.get("password"), str):
        _write_state(data_dir, {**state, "user": USER, "database": DATABASE,
                                "password": secrets.token_urlsafe(24)})


def _conf_string(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _write_conf(data_dir: Path, port: int) -> None:
    settings = {
        "listen_addresses": _conf_string(_HOST),
        "port": str(port),
        "unix_socket_directories": _conf_string(str(data_dir / _SOCKETS)),
        "password_encryption": "'scram-sha-256'",
        # A server for tests: speed, not durability.
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
        # Every test's stores and worker processes hold small pools.
        "max_connections": "200",
    }
    text = "# Written by scripts/localpg.py at every start; edits are lost.\n"
    text += "".join(f"{key} = {value}\n" for key, value in settings.items())
    (data_dir / _CLUSTER / _CONF).write_text(text)


def _log_size(data_dir: Path) -> int:
    try:
        return (data_dir / _LOG).stat().st_size
    except FileNotFoundError:
        return 0


def _log_since(data_dir: Path, offset: int) -> str:
    try:
        with (data_dir / _LOG).open("rb") as handle:
            handle.seek(offset)
            text = handle.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-30:])


def _pg_isready(bindir: Path, port: int) -> bool:
    result = _run([str(bindir / "pg_isready"), "-q", "-h", _HOST, "-p", str(port), "-d",
                   "postgres", "-t", "2"], check=False, timeout=10)
    return result.returncode == 0


def _wait_ready(bindir: Path, cluster: Path, pid: int, port: int, timeout: float) -> None:
    """Poll until the server accepts TCP connections; fail fast if it dies."""
    deadline = time.monotonic() + timeout
    while not _pg_isready(bindir, port):
        if not _is_our_postmaster(pid, cluster):
            raise PgError(f"PostgreSQL (pid {pid}) exited while starting")
        if time.monotonic() >= deadline:
            raise PgError(f"PostgreSQL on {_HOST}:{port} not accepting connections after "
                          f"{timeout:g} s")
        time.sleep(0.1)


# psql quotes :'var' as a literal and format(%I) as an identifier: nothing is spliced
# into SQL unquoted.
_ROLE_AND_DATABASE = """\
SELECT format('CREATE ROLE %I LOGIN CREATEDB', :'u')
  WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'u') \\gexec
SELECT format('ALTER ROLE %I LOGIN CREATEDB PASSWORD %L', :'u', :'pw') \\gexec
SELECT format('CREATE DATABASE %I OWNER %I', :'d', :'u')
  WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'d') \\gexec
"""


def _psql_string(value: str) -> str:
    """A psql meta-command argument in single quotes (taken literally)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _ensure_role_and_database(bindir: Path, data_dir: Path, account: str | None,
                              port: int) -> None:
    """Create (or refresh) the login role and its database, as the superuser over the
    unix socket."""
    state = _read_state(data_dir)
    user, database, password = (str(state.get(k)) for k in ("user", "database", "password"))
    variables = (f"\\set ON_ERROR_STOP 1\n\\set u {_psql_string(user)}\n"
                 f"\\set d {_psql_string(database)}\n\\set pw {_psql_string(password)}\n")
    script = variables + _ROLE_AND_DATABASE
    _run([str(bindir / "psql"), "-X", "-q", "-h", str(data_dir / _SOCKETS), "-p", str(port),
          "-U", SUPERUSER, "-d", "postgres", "-f", "-"],
         account=account, input=script, cwd=data_dir, timeout=60)


def _launch(bindir: Path, data_dir: Path, account: str | None, port: int,
            timeout: float) -> int:
    """Write the config, start the postmaster with pg_ctl; return its pid."""
    cluster = data_dir / _CLUSTER
    socket_path = data_dir / _SOCKETS / f".s.PGSQL.{port}"
    if len(str(socket_path)) > _MAX_SOCKET_PATH:
        raise PgError(f"the socket path {socket_path} is longer than {_MAX_SOCKET_PATH} bytes; "
                      "use a shorter data dir")
    _write_conf(data_dir, port)
    mark = _log_size(data_dir)
    result = _run(
        [str(bindir / "pg_ctl"), "-D", str(cluster), "-l", str(data_dir / _LOG), "-w", "-t",
         str(max(1, int(timeout))), "-s", "start"],
        account=account, cwd=data_dir, timeout=timeout + 30, check=False,
    )  # fmt: skip
    info = _postmaster_info(cluster)
    if result.returncode != 0 or info is None or not _is_our_postmaster(info[0], cluster):
        server_log = _log_since(data_dir, mark)
        error = _PortInUseError if "could not bind" in server_log else PgError
        raise error(f"PostgreSQL did not start (pg_ctl exit {result.returncode}):\n"
                    f"{result.stdout}{result.stderr}--- {data_dir / _LOG} ---\n{server_log}")
    return info[0]


def running(data_dir: Path = DEFAULT_DATA_DIR) -> PgServer | None:
    """The server of ``data_dir`` if its postmaster is alive and accepts connections.

    With ``NOTICE_RELAY_TEST_POSTGRES_URL`` set, returns that (unprobed) server.
    """
    external = _external()
    if external is not None:
        return external
    data_dir = Path(data_dir).resolve()
    info = _postmaster_info(data_dir / _CLUSTER)
    if info is None or not _is_our_postmaster(info[0], data_dir / _CLUSTER):
        return None
    bindir = find_bindir()
    if bindir is None or not _pg_isready(bindir, info[1]):
        return None
    return _server_from(data_dir, *info)


def start(data_dir: Path, port: int | None = None, timeout: float = 60) -> PgServer:
    """Start (or reuse) the server of ``data_dir``; wait until it accepts connections.

    Installs PostgreSQL first if needed, runs ``initdb`` on first use (databases
    survive a stop/start), creates the ``notice_relay`` role and database, and returns
    once a client can connect over TCP. If this data dir's server already runs, returns
    it. A ``port`` left as ``None`` is picked free (and re-picked if another process
    grabs it first). With ``NOTICE_RELAY_TEST_POSTGRES_URL`` set, starts nothing and
    returns that server with ``owned=False``.

    Raises:
        PgError: The port is taken, the running server uses another port than
            requested, or the server does not start within ``timeout`` seconds (the
            message then carries the server's log).
    """
    external = _external()
    if external is not None:
        return external
    data_dir = Path(data_dir).resolve()
    bindir = ensure_installed()
    account = _server_account()
    data_dir.mkdir(parents=True, exist_ok=True)
    # Serialises concurrent start/stop of one data dir: the second caller waits, then
    # reuses the server.
    with _locked(data_dir / _LOCK):
        _prepare(data_dir, account)
        _ensure_state(data_dir)
        cluster = data_dir / _CLUSTER
        info = _postmaster_info(cluster)
        if info is not None and _is_our_postmaster(info[0], cluster):
            pid, current = info
            if port is not None and port != current:
                raise PgError(f"the server of {data_dir} already runs on port {current}; "
                              "stop it to change ports")
            _wait_ready(bindir, cluster, pid, current, timeout)
            _ensure_role_and_database(bindir, data_dir, account, current)
            server = _server_from(data_dir, pid, current)
            if server is None:
                raise PgError(f"{data_dir / _STATE} is missing: stop the server and start again")
            return server
        if port is not None and not _port_is_free(port):
            raise PgError(f"port {port} on {_HOST} is already in use")
        _initdb(bindir, data_dir, account)
        attempts = 1 if port is not None else 3
        for attempt in range(1, attempts + 1):
            chosen = port if port is not None else free_port()
            started = time.monotonic()
            try:
                pid = _launch(bindir, data_dir, account, chosen, timeout)
            except _PortInUseError:
                if attempt == attempts:
                    raise
                log.info("port %d was taken meanwhile; retrying with another", chosen)
                continue
            try:
                _wait_ready(bindir, cluster, pid, chosen, timeout)
                _ensure_role_and_database(bindir, data_dir, account, chosen)
            except BaseException:
                # Includes Ctrl-C: never leave a half-started server behind.
                _terminate(bindir, data_dir, account, pid)
                raise
            _write_state(data_dir, {**_read_state(data_dir), "port": chosen})
            server = _server_from(data_dir, pid, chosen)
            assert server is not None  # the state file was written by _initdb
            log.info("PostgreSQL pid %d accepting connections on %s:%d after %.1f s",
                     pid, _HOST, chosen, time.monotonic() - started)
            return server
    raise AssertionError("unreachable")


def _terminate(bindir: Path, data_dir: Path, account: str | None, pid: int) -> None:
    """``pg_ctl stop -m fast`` (SIGINT: roll back, disconnect, shut down cleanly), then
    SIGQUIT (immediate) and SIGKILL if the postmaster outlives them."""
    cluster = data_dir / _CLUSTER
    if not _is_our_postmaster(pid, cluster):
        return
    _run([str(bindir / "pg_ctl"), "-D", str(cluster), "-m", "fast", "-w", "-t", "30", "-s",
          "stop"], account=account, cwd=data_dir, timeout=60, check=False)
    for sig, wait in ((signal.SIGQUIT, 10.0), (signal.SIGKILL, 5.0)):
        deadline = time.monotonic() + 5.0
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not _pid_alive(pid):
            return
        log.warning("PostgreSQL pid %d is still running; sending %s", pid, sig.name)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
    if _pid_alive(pid):
        raise PgError(f"PostgreSQL pid {pid} survived SIGKILL")


def stop(server: PgServer) -> None:
    """Stop a server that :func:`start` launched; a no-op for ``owned=False``.

    Stops only the postmaster whose pid :func:`start` returned, after checking it still
    is this data dir's server. Data is kept.
    """
    if not server.owned or server.pid is None:
        return
    data_dir = Path(server.data_dir).resolve()
    if not data_dir.is_dir():
        return
    bindir = find_bindir()
    if bindir is None:
        raise PgError("no PostgreSQL binaries found to stop the server with")
    with _locked(data_dir / _LOCK):
        info = _postmaster_info(data_dir / _CLUSTER)
        if info is None or info[0] != server.pid:
            return  # stopped already, or a later start's server: not ours to stop
        _terminate(bindir, data_dir, _server_account(), server.pid)


# --------------------------------------------------------------------------- CLI


def _cli_start(data_dir: Path, port: int | None, timeout: float) -> int:
    server = running(data_dir)
    if server is None or port is not None:
        if port is None:
            last = _read_state(data_dir).get("port")
            port = last if isinstance(last, int) else DEFAULT_PORT
        server = start(data_dir, port, timeout=timeout)
    print(server.url)
    return 0


def _cli_status(data_dir: Path) -> int:
    server = running(data_dir)
    if server is None:
        print("not running")
        return 1
    print(f"{server.url} pid {server.pid}" if server.owned else f"{server.url} (external)")
    return 0


def _cli_stop(data_dir: Path) -> int:
    if _external() is not None:
        log.info("%s is set: not stopping an external server", URL_ENV)
        return 0
    # By the pid file alone (no probe), so a server that stopped answering can still
    # be stopped.
    info = _postmaster_info(data_dir / _CLUSTER)
    if info is None or not _is_our_postmaster(info[0], data_dir / _CLUSTER):
        print("not running")
        return 0
    server = _server_from(data_dir, *info) or PgServer(
        _HOST, info[1], USER, "", DATABASE, info[0], data_dir, owned=True)
    stop(server)
    print(f"stopped pid {info[0]}")
    return 0


def _main(argv: list[str] | None = None) -> int:
    """Run the CLI; return the process exit status."""
    parser = argparse.ArgumentParser(
        prog="localpg.py",
        description="A local PostgreSQL server (Debian's packages) for development and tests.",
        epilog=f"With {URL_ENV} set, start/status/stop use that server and start nothing.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("install", help="install Debian's postgresql package when missing")
    for name, text in (
        ("start", "start the server (or reuse the running one); print its URL"),
        ("status", "print the URL if running; exit 1 if not"),
        ("stop", "stop the server of the data dir"),
    ):
        command = commands.add_parser(name, help=text)
        command.add_argument(
            "--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="default: %(default)s"
        )
        if name == "start":
            command.add_argument(
                "--port", type=int,
                help=f"TCP port on {_HOST}; default: the one used last, or {DEFAULT_PORT}",
            )
            command.add_argument(
                "--timeout", type=float, default=60.0, help="seconds to wait, default %(default)s"
            )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="localpg: %(message)s", stream=sys.stderr)
    try:
        if args.command == "install":
            if _external() is not None:
                log.info("%s is set: nothing to install", URL_ENV)
                return 0
            print(ensure_installed())
            return 0
        data_dir: Path = args.data_dir.resolve()
        if args.command == "start":
            return _cli_start(data_dir, args.port, args.timeout)
        if args.command == "status":
            return _cli_status(data_dir)
        return _cli_stop(data_dir)
    except PgError as exc:
        print(f"localpg: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(_main())
