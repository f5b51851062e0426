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
from conftest import Env, WorkerProcess, wait_until

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


def ready_worker(env: Env, **extra: str) -> WorkerProcess:
    """A worker process logging at info level, once faust says it is ready."""
    worker = WorkerProcess(env, loglevel="info", **extra).start()

    def ready() -> bool:
        assert worker.proc is not None
        assert worker.proc.poll() is None, worker.output()[-3000:]
        return "Ready" in worker.output()
    wait_until(ready, 120, what="the worker to start")
    return worker


def stopped_within(worker: WorkerProcess, seconds: float) -> tuple[int | None, float]:
    """SIGTERM; the exit status (None: still running after ``seconds``) and the time."""
    proc = worker.proc
    assert proc is not None
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
    worker = ready_worker(env, NOTICE_RELAY_STOP_TIMEOUT="5s")
    try:
        localkafka.stop(own_broker)
        time.sleep(2)
        status, took = stopped_within(worker, 60)
    finally:
        worker.kill()
    out = worker.output()
    assert status == STOP_TIMEOUT_STATUS, (status, out[-3000:])
    print(f"stop with the broker gone: {took:.1f} s")
    assert 4.5 <= took < 30, took
    assert "worker.stop_timeout" in out


@pytest.mark.kafka
def test_a_worker_stops_cleanly_before_its_deadline_when_the_broker_is_there(
        relay_env: Env) -> None:
    prepare(relay_env)
    worker = ready_worker(relay_env)
    try:
        status, took = stopped_within(worker, 60)
    finally:
        worker.kill()
    out = worker.output()
    assert status == 0, (status, out[-3000:])
    print(f"clean stop: {took:.1f} s")
    assert took < 30, took
    assert "worker.stop_timeout" not in out
