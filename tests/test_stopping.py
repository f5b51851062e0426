"""A worker's stop is bounded: told to stop while its broker is gone, it ends within
``NOTICE_RELAY_STOP_TIMEOUT`` (faust alone retries for ever); with the broker there, it
stops cleanly, well within the deadline. Real worker processes and a Kafka broker of the
test's own, so that stopping it leaves the other tests' broker alone."""

from __future__ import annotations

import base64
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Env, wait_until

from notice_relay.stopping import STOP_TIMEOUT_STATUS, StopDeadline

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import localkafka  # noqa: E402

# ---------------------------------------------------------------- the deadline alone


def test_the_deadline_ends_the_process_with_its_status_once_expired() -> None:
    ended: list[int] = []
    done = threading.Event()
    deadline = StopDeadline(0.2, exit=lambda status: (ended.append(status), done.set()))
    deadline.arm()
    deadline.arm()  # a second stop does not start a second countdown
    assert done.wait(5)
    time.sleep(0.3)
    assert ended == [STOP_TIMEOUT_STATUS]


def test_a_zero_deadline_never_fires() -> None:
    ended: list[int] = []
    never = StopDeadline(0, exit=ended.append)
    never.arm()
    assert not never.armed
    time.sleep(0.6)
    assert ended == []


# ---------------------------------------------------------------- real workers


@pytest.fixture
def own_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[localkafka.KafkaNode]:
    """A broker for this test alone."""
    node = localkafka.start(tmp_path_factory.mktemp("kafka-own"))
    try:
        yield node
    finally:
        localkafka.stop(node)


def prepare(env: Env) -> None:
    """A publisher and a developer (never sent anything here)."""
    env.write_publishers("artfolio")
    env.add_webhook_developer("acme-ai", "http://127.0.0.1:9/hook",
                              "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode())


def start_worker(env: Env, log: Path, **extra: str) -> subprocess.Popen[bytes]:
    with log.open("ab") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "notice_relay", "worker", "--loglevel", "info"],
            env=env.environ(**extra), cwd=env.root, stdout=fh, stderr=subprocess.STDOUT,
            start_new_session=True)


def wait_ready(proc: subprocess.Popen[bytes], log: Path) -> None:
    def ready() -> bool:
        assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        return "Ready" in log.read_text(errors="replace")
    wait_until(ready, 120, what="the worker to start")


def stopped_within(proc: subprocess.Popen[bytes], seconds: float) -> tuple[int | None, float]:
    """SIGTERM; the exit status (None: still running after ``seconds``) and the time."""
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        status: int | None = proc.wait(seconds)
    except subprocess.TimeoutExpired:
        status = None
    return status, time.monotonic() - t0


@pytest.mark.kafka
def test_a_worker_told_to_stop_with_its_broker_gone_ends_at_its_deadline(
        own_broker: localkafka.KafkaNode, tmp_path: Path) -> None:
    env = Env(root=tmp_path, bootstrap=own_broker.bootstrap)
    prepare(env)
    log = tmp_path / "worker.log"
    proc = start_worker(env, log, NOTICE_RELAY_STOP_TIMEOUT="5s")
    try:
        wait_ready(proc, log)
        localkafka.stop(own_broker)
        time.sleep(2)
        status, took = stopped_within(proc, 60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    out = log.read_text(errors="replace")
    assert status == STOP_TIMEOUT_STATUS, (status, out[-3000:])
    print(f"stop with the broker gone: {took:.1f} s")
    assert 4.5 <= took < 30, took
    assert "worker.stop_timeout" in out


@pytest.mark.kafka
def test_a_worker_stops_cleanly_before_its_deadline_when_the_broker_is_there(
        relay_env: Env) -> None:
    prepare(relay_env)
    log = relay_env.root / "worker.log"
    proc = start_worker(relay_env, log)
    try:
        wait_ready(proc, log)
        status, took = stopped_within(proc, 60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    out = log.read_text(errors="replace")
    assert status == 0, (status, out[-3000:])
    print(f"clean stop: {took:.1f} s")
    assert took < 30, took
    assert "worker.stop_timeout" not in out
