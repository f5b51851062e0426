"""Fixtures that start real servers: one Kafka broker per test run (KRaft, from
``scripts/localkafka.py``), and helpers to run real worker processes with their own
topics, consumer group, store and connectors per test."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import localkafka  # noqa: E402


@pytest.fixture(scope="session")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Kafka broker for the whole run; its bootstrap address."""
    data = tmp_path_factory.mktemp("kafka")
    node = localkafka.start(data)
    try:
        yield node.bootstrap
    finally:
        localkafka.stop(node)


@dataclass
class Env:
    """A test's own corner of the relay: topic prefix, group, store, registry."""

    root: Path
    bootstrap: str
    prefix: str = field(default_factory=lambda: f"t{uuid.uuid4().hex[:10]}.")
    app_id: str = field(default_factory=lambda: f"nr-test-{uuid.uuid4().hex[:10]}")
    secrets: dict[str, str] = field(default_factory=dict)

    @property
    def connectors(self) -> Path:
        """The test's connectors directory."""
        return self.root / "connectors"

    @property
    def publishers(self) -> Path:
        """The test's publisher registry."""
        return self.root / "publishers.toml"

    @property
    def database_url(self) -> str:
        """The test's audit store."""
        return f"sqlite+aiosqlite:///{self.root / 'audit.db'}"

    def environ(self, **extra: str) -> dict[str, str]:
        """The environment a worker or CLI process of this test runs with."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("NOTICE_RELAY_")}
        env.update({
            "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap,
            "NOTICE_RELAY_TOPIC_PREFIX": self.prefix,
            "NOTICE_RELAY_APP_ID": self.app_id,
            "NOTICE_RELAY_DATABASE_URL": self.database_url,
            "NOTICE_RELAY_CONNECTORS": str(self.connectors),
            "NOTICE_RELAY_PUBLISHERS": str(self.publishers),
            "NOTICE_RELAY_DATA_DIR": str(self.root / "faust"),
            "NOTICE_RELAY_PARTITIONS": "4",
            "NOTICE_RELAY_LOG_FORMAT": "json",
        })
        env.update(self.secrets)
        env.update(extra)
        return env

    def settings(self) -> Any:
        """Settings equal to what this test's processes read."""
        from notice_relay.config import Settings

        return Settings(
            kafka_bootstrap=self.bootstrap, topic_prefix=self.prefix, app_id=self.app_id,
            database_url=self.database_url, connectors_dir=self.connectors,
            publishers_file=self.publishers, data_dir=self.root / "faust", partitions=4,
        )

    def write_publishers(self, *ids: str) -> None:
        """Register publishers."""
        self.publishers.write_text("".join(
            f'[[publisher]]\nid = "{p}"\nname = "{p}"\n\n' for p in ids), encoding="utf-8")

    def add_webhook_developer(self, dev_id: str, url: str, secret: str, *,
                              accepts: tuple[str, ...] = ("train-ai", "train-genai"),
                              extra: str = "") -> None:
        """Register a developer reached by a webhook at ``url``."""
        self.connectors.mkdir(parents=True, exist_ok=True)
        var = "WHSEC_" + dev_id.upper().replace("-", "_").replace(".", "_")
        self.secrets[var] = secret
        (self.connectors / f"{dev_id}.toml").write_text(
            f'id = "{dev_id}"\nname = "{dev_id}"\naccepts = {json.dumps(list(accepts))}\n'
            f'ack_sla = "30d"\n\n[[channel]]\ntype = "webhook"\nurl = "{url}"\n'
            f'secret_env = "{var}"\ntimeout = "5s"\nallow_http = true\nallow_private = true\n'
            f"{extra}",
            encoding="utf-8",
        )

    def cli(
        self, *args: str, input: bytes | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[bytes]:
        """Run ``notice-relay ARGS`` as its own process."""
        return subprocess.run(
            [sys.executable, "-m", "notice_relay", *args], env=self.environ(), cwd=self.root,
            input=input, capture_output=True, timeout=timeout, check=False,
        )


@pytest.fixture
def relay_env(kafka: str, tmp_path: Path) -> Env:
    """A fresh topic prefix, consumer group, audit store and registry on the real broker."""
    return Env(root=tmp_path, bootstrap=kafka)


class WorkerProcess:
    """A real ``notice-relay worker`` process."""

    def __init__(self, env: Env, name: str = "worker", *, loglevel: str | None = None,
                 **extra: str) -> None:
        self.env = env
        self.log = env.root / f"{name}.log"
        self.loglevel = loglevel or os.environ.get("NOTICE_RELAY_TEST_WORKER_LOGLEVEL", "warning")
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        """Start the process (it creates its topics first)."""
        fh = self.log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "notice_relay", "worker", "--loglevel", self.loglevel],
            env=self.env.environ(**self.extra), cwd=self.env.root, stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        fh.close()
        return self

    def kill(self) -> None:
        """SIGKILL: no chance to commit or flush anything."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 20 s."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    def output(self) -> str:
        """What the worker logged."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@pytest.fixture
def worker_factory(relay_env: Env) -> Iterator[Any]:
    """Start worker processes for the test; all are stopped at its end."""
    started: list[WorkerProcess] = []

    def make(name: str = "worker") -> WorkerProcess:
        w = WorkerProcess(relay_env, name).start()
        started.append(w)
        return w

    yield make
    for w in started:
        w.stop()


def wait_until(
    predicate: Any, timeout: float, interval: float = 0.25, what: str = "condition"
) -> None:
    """Poll ``predicate`` until true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
