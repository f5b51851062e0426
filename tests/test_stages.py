"""Pure stage logic: retry delays, outcome handling, rejection keys, fan-out planning."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from builders import make_notice, make_task

from notice_relay.connectors import Developer
from notice_relay.errors import DeclarationInvalid
from notice_relay.fanout import delivery_id, plan_deliveries
from notice_relay.models import AuditType, FieldError, Outcome, OutcomeKind, Use
from notice_relay.stages import (
    DEFAULT_RETRY_SCHEDULE,
    Out,
    on_outcome,
    reject,
    rejection_key,
    retry_delay,
)

NOW = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


def dev(
    dev_id: str, accepts: list[str], channels: list[dict[str, object]] | None = None
) -> Developer:
    """A developer built the way the connector loader builds one."""
    return Developer.model_validate({
        "id": dev_id, "name": dev_id, "accepts": accepts,
        "channel": channels or [{"type": "webhook", "url": f"https://{dev_id}.example.invalid/h",
                                 "secret_env": "X"}],
    })


def test_retry_delay_stays_within_jitter_bounds() -> None:
    """Every delay lies within ±20% of the schedule step, over many draws."""
    rng = random.Random(7)
    for attempt, step in enumerate(DEFAULT_RETRY_SCHEDULE, start=1):
        for _ in range(200):
            d = retry_delay(attempt, DEFAULT_RETRY_SCHEDULE, rng=rng)
            assert d is not None
            assert step * 0.8 <= d <= step * 1.2


def test_retry_delay_spent_schedule_returns_none() -> None:
    """After the last step there is no further retry."""
    assert retry_delay(len(DEFAULT_RETRY_SCHEDULE) + 1, DEFAULT_RETRY_SCHEDULE) is None


def test_retry_after_is_a_floor() -> None:
    """A receiver's Retry-After is never shortened by the schedule or jitter."""
    sched = [timedelta(seconds=1)]
    for seed in range(50):
        d = retry_delay(1, sched, retry_after=30, rng=random.Random(seed))
        assert d is not None
        assert d >= timedelta(seconds=30)


def test_delivered_outcome_audits_attempt_and_delivery() -> None:
    """A delivered outcome yields delivery.attempted then delivery.delivered, no retry."""
    task = make_task()
    out = on_outcome(task, Outcome.delivered(task, receipt="r1", status_code=200))
    assert [e.type for e in out.audit] == [
        AuditType.DELIVERY_ATTEMPTED,
        AuditType.DELIVERY_DELIVERED,
    ]
    assert out.retries == []
    assert out.audit[1].data["receipt"] == "r1"


def test_transient_outcome_schedules_a_durable_retry() -> None:
    """A transient outcome puts the next attempt on the retries topic with its due time."""
    task = make_task()
    o = Outcome.transient(task, "HTTP 503", status_code=503, attempted_at=NOW)
    out = on_outcome(task, o, schedule=[timedelta(seconds=10)], rng=random.Random(1))
    [retry] = out.retries
    assert retry.attempt == 2
    assert retry.delivery_id == task.delivery_id
    assert retry.not_before is not None
    assert timedelta(seconds=8) <= retry.not_before - NOW <= timedelta(seconds=12)
    assert out.audit[-1].type is AuditType.DELIVERY_RETRY_SCHEDULED


def test_exhausted_attempts_fail_with_last_error() -> None:
    """A transient failure past the schedule fails the delivery, naming the last error."""
    task = make_task(attempt=2)
    o = Outcome.transient(task, "connection refused")
    out = on_outcome(task, o, schedule=[timedelta(seconds=1)])
    assert out.retries == []
    assert out.audit[-1].type is AuditType.DELIVERY_FAILED
    assert "connection refused" in str(out.audit[-1].data["error"])


def test_permanent_outcome_fails_without_retry() -> None:
    """A permanent outcome fails at once."""
    task = make_task()
    out = on_outcome(task, Outcome.permanent(task, "HTTP 400", status_code=400))
    assert out.retries == []
    assert out.audit[-1].type is AuditType.DELIVERY_FAILED


def test_audit_event_ids_are_stable_across_reprocessing() -> None:
    """The same outcome processed twice yields the same event ids (the store dedupes)."""
    task = make_task()
    o = Outcome.delivered(task, attempted_at=NOW)
    a = [e.event_id for e in on_outcome(task, o).audit]
    b = [e.event_id for e in on_outcome(task, o).audit]
    assert a == b
    assert len(set(a)) == 2


def test_rejection_joins_the_trail_of_a_readable_id() -> None:
    """A rejected declaration whose ids are readable is audited under publisher/declaration."""
    raw = b'{"publisher_id": "artfolio", "declaration_id": "d-1", "bogus": 1}'
    assert rejection_key(raw) == "artfolio/d-1"
    assert rejection_key(b"\xff\xfe").startswith("_unparseable/sha256:")
    out = reject(raw, None, DeclarationInvalid("1 invalid field: bogus",
                 [FieldError(field="bogus", message="unknown field")]), NOW)
    [(_, rej)] = out.rejected
    assert rej.errors[0].field == "bogus"
    assert out.audit[0].type is AuditType.DECLARATION_REJECTED


def test_fanout_targets_accepts_and_skips() -> None:
    """Fan-out plans one task per targeted developer sharing a use, and audits each skip."""
    devs = {
        "a": dev("a", ["train-ai"]),
        "b": dev("b", ["ai-inference"]),
        "c": dev("c", ["data-mining"]),
    }
    notice = make_notice(uses=[Use.TRAIN_AI, Use.TRAIN_GENAI])
    plan = plan_deliveries(notice, ["*"], devs, now=NOW)
    assert [t.developer_id for t in plan.tasks] == ["a"]
    skipped = [e for e in plan.events if e.type is AuditType.DELIVERY_SKIPPED]
    assert {e.developer_id for e in skipped} == {"b", "c"}
    plan2 = plan_deliveries(notice, ["b"], devs, now=NOW)
    assert plan2.tasks == []


def test_fanout_one_task_per_enabled_channel() -> None:
    """A developer with two channels gets two tasks; a disabled channel gets none."""
    d = dev("a", ["train-ai"], [
        {"type": "webhook", "name": "one", "url": "https://a.example.invalid/1", "secret_env": "X"},
        {"type": "webhook", "name": "two", "url": "https://a.example.invalid/2", "secret_env": "X"},
        {"type": "webhook", "name": "off", "url": "https://a.example.invalid/3", "secret_env": "X",
         "enabled": False},
    ])
    plan = plan_deliveries(make_notice(uses=[Use.TRAIN_AI]), ["a"], {"a": d}, now=NOW)
    assert sorted(t.channel for t in plan.tasks) == ["one", "two"]


def test_delivery_id_is_stable_and_distinct() -> None:
    """The delivery id depends only on notice, developer and channel."""
    assert delivery_id("n1", "a", "webhook") == delivery_id("n1", "a", "webhook")
    assert len({delivery_id("n1", "a", "webhook"), delivery_id("n1", "a", "w2"),
                delivery_id("n2", "a", "webhook"), delivery_id("n1", "b", "webhook")}) == 4


def test_outcome_kinds_are_exhaustive() -> None:
    """on_outcome handles every outcome kind (a new kind must not fall through silently)."""
    task = make_task()
    for kind in OutcomeKind:
        o = Outcome(delivery_id=task.delivery_id, kind=kind, attempt=1, attempted_at=NOW,
                    error=None if kind is OutcomeKind.DELIVERED else "x")
        assert on_outcome(task, o).audit



def test_out_extend_appends_every_topic_in_order() -> None:
    first = Out(deliveries=[make_task()], retries=[make_task()])
    task = make_task()
    retried = on_outcome(task, Outcome.transient(task, "HTTP 503", status_code=503),
                         schedule=[timedelta(seconds=10)], rng=random.Random(1))
    rejected = reject(b"{", None, DeclarationInvalid("not JSON", []), NOW)
    before_deliveries, before_retries = list(first.deliveries), list(first.retries)
    assert first.extend(retried).extend(rejected) is first
    assert first.deliveries == before_deliveries
    assert first.retries == [*before_retries, *retried.retries]
    assert retried.retries
    assert first.audit == [*retried.audit, *rejected.audit]
    assert first.rejected == rejected.rejected
    assert first.rejected
    assert first.notices == []
