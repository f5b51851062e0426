"""Fixtures for tests that run against a real PostgreSQL server as well as SQLite.

A pytest plugin module: a test module loads it with ``pytest_plugins = ["pg"]``.

- ``postgres`` (session): one real server for the whole run, started by
  ``scripts/localpg.py`` (installed from Debian's packages when missing) in a
  temporary data dir and stopped at the end; or the server
  ``NOTICE_RELAY_TEST_POSTGRES_URL`` points at (its user needs ``CREATEDB``).
- ``pg_database``: a factory of fresh, empty databases on that server, each dropped
  at the end of the test, so tests never see each other's rows.
- ``database_factory`` / ``database_url``: parametrized over ``sqlite`` and
  ``postgresql``: every test using them runs once per backend. The PostgreSQL case
  carries the ``postgres`` marker (``-m "not postgres"`` runs SQLite only).
- ``store``: a fresh :class:`AuditStore` opened on ``database_url``, closed after.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

_SCRIPTS = str(Path(__file__).resolve().parent.parent / "scripts")
if _SCRIPTS not in sys.path:
    sys.path.insert(0, _SCRIPTS)

import localpg  # noqa: E402

from notice_relay.audit.store import AuditStore  # noqa: E402

BACKENDS = ["sqlite", "postgresql"]


def pytest_configure(config: pytest.Config) -> None:
    """Register the ``postgres`` marker."""
    config.addinivalue_line(
        "markers", "postgres: runs against a real PostgreSQL server (started by the fixtures)"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that runs on PostgreSQL ``postgres``. (Marking the parameter
    itself would name the marker when this module is imported, before
    ``pytest_configure`` registered it.)"""
    for item in items:
        callspec = getattr(item, "callspec", None)
        uses_pg = "postgres" in getattr(item, "fixturenames", ())
        on_pg = callspec is not None and callspec.params.get("database_factory") == "postgresql"
        if uses_pg or on_pg:
            item.add_marker("postgres")


@pytest.fixture(scope="session")
def postgres() -> Iterator[localpg.PgServer]:
    """A real PostgreSQL server for the whole run."""
    # Not pytest's tmp_path: that is private (0700), and run as root the server runs
    # as the postgres account, which must reach its data dir.
    data = Path(tempfile.mkdtemp(prefix="nr-pg-"))
    try:
        server = localpg.start(data)
        try:
            yield server
        finally:
            localpg.stop(server)
    finally:
        shutil.rmtree(data, ignore_errors=True)


def _admin(server: localpg.PgServer, *statements: str) -> None:
    """Run statements on the server's own database (CREATE/DROP DATABASE cannot run in
    a transaction, and asyncpg runs each outside one)."""

    async def run() -> None:
        import asyncpg

        conn = await asyncpg.connect(server.dsn)
        try:
            for sql in statements:
                await conn.execute(sql)
        finally:
            await conn.close()

    # Its own thread and event loop: this is called from sync fixtures, possibly while
    # the test's loop exists, and must not touch it.
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, run()).result()


@pytest.fixture
def pg_database(postgres: localpg.PgServer) -> Iterator[Callable[[], str]]:
    """A factory of fresh databases on the server; returns each one's SQLAlchemy URL.
    Every database it made is dropped at the end of the test."""
    made: list[str] = []

    def make() -> str:
        name = f"nr_test_{uuid.uuid4().hex[:16]}"
        _admin(postgres, f'CREATE DATABASE "{name}"')
        made.append(name)
        return postgres.url_for(name)

    yield make
    if made:
        # FORCE: a connection a test left open must not keep its database alive.
        _admin(postgres, *(f'DROP DATABASE IF EXISTS "{n}" WITH (FORCE)' for n in made))


@pytest.fixture(params=BACKENDS)
def database_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], str]:
    """A factory of fresh, empty audit store URLs on the test's backend."""
    if request.param == "postgresql":
        factory: Callable[[], str] = request.getfixturevalue("pg_database")
        return factory
    counter = iter(range(1_000_000))

    def sqlite_url() -> str:
        return f"sqlite+aiosqlite:///{tmp_path / f'audit-{next(counter)}.db'}"

    return sqlite_url


@pytest.fixture
def database_url(database_factory: Callable[[], str]) -> str:
    """A fresh, empty audit store URL on the test's backend (SQLite, PostgreSQL)."""
    return database_factory()


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[AuditStore]:
    """A fresh audit store on the test's backend (SQLite, PostgreSQL)."""
    s = await AuditStore.open(database_url)
    try:
        yield s
    finally:
        await s.close()


def backend_of(url: str) -> str:
    """``sqlite`` or ``postgresql``."""
    return url.split(":", 1)[0].split("+", 1)[0]

