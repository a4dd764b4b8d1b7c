"""The scheduled tasks: each team closed after its own midnight, finalized after its grace, nothing twice.

Time is moved with time-machine; the tasks run eagerly (in-process) except in the last
test, which runs a real Celery worker on the Redis broker.
"""
import os
import subprocess
import sys
import time
import types
import uuid
import zoneinfo
from datetime import date, datetime, timedelta
from pathlib import Path

import pytest
import time_machine
from django.conf import settings

from billing.models import BillingPeriod, Invoice, InvoiceLine
from billing.tasks import (
    period_close_task, periods_close_due_task, periods_due_to_close, periods_finalize_due_task,
)
from billing.tests.factories import BillingPolicyFactory, MemberJoinedFactory, usage
from qwenhub.celery import app as celery_app
from tenants.models import AuditEvent, QuotaCounter, Team
from tenants.tests.factories import TeamFactory

ROOT = Path(__file__).resolve().parents[2]
UTC = zoneinfo.ZoneInfo("UTC")
SEP, OCT, NOV, DEC = date(2026, 9, 1), date(2026, 10, 1), date(2026, 11, 1), date(2026, 12, 1)
# The teams start using QwenHub in November: it is the first month the schedule closes.
CREATED = datetime(2026, 11, 2, tzinfo=UTC)


@pytest.fixture
def eager():
    """Run enqueued tasks in-process, as the embedded web process does."""
    before = {key: celery_app.conf[key] for key in ("task_always_eager", "task_eager_propagates")}
    celery_app.conf.update(task_always_eager=True, task_eager_propagates=True)
    yield
    celery_app.conf.update(before)


def _team(tz: str, created=CREATED, **kwargs) -> Team:
    team = TeamFactory(timezone=tz, monthly_cost="3000.00", **kwargs)
    Team.objects.filter(pk=team.pk).update(created_at=created)
    a, b = MemberJoinedFactory(team=team), MemberJoinedFactory(team=team)
    usage(a, NOV, prompt=1000, completion=1000)
    usage(b, NOV, prompt=500, completion=500)
    return team


def _at(*args):
    return time_machine.travel(datetime(*args, tzinfo=UTC), tick=False)


def _statuses() -> dict:
    return {(p.team.timezone, p.start): p.status for p in BillingPeriod.objects.select_related("team")}


@pytest.mark.django_db
def test_each_team_is_closed_after_its_own_midnight_and_only_once(eager):
    shanghai, utc = _team("Asia/Shanghai"), _team("UTC")
    with _at(2026, 11, 30, 15, 59):  # 23:59 in Shanghai
        assert periods_close_due_task.delay().get() == 0
    assert BillingPeriod.objects.count() == 0
    with _at(2026, 11, 30, 16, 5):  # 00:05 on 1 December in Shanghai, still November in UTC
        assert periods_close_due_task.delay().get() == 1
    assert _statuses() == {("Asia/Shanghai", NOV): "closed"}
    assert Invoice.objects.filter(team=shanghai).count() == 2
    # The close opened Shanghai's December counters (the quota reset), not yet UTC's.
    assert QuotaCounter.objects.filter(member__team=shanghai, period_start=DEC).count() == 2
    assert not QuotaCounter.objects.filter(member__team=utc, period_start=DEC).exists()
    with _at(2026, 11, 30, 23, 59):
        assert periods_close_due_task.delay().get() == 0
    with _at(2026, 12, 1, 0, 5):  # UTC's own midnight
        assert periods_close_due_task.delay().get() == 1
        assert periods_close_due_task.delay().get() == 0  # a rerun finds nothing due
    assert _statuses() == {("Asia/Shanghai", NOV): "closed", ("UTC", NOV): "closed"}
    assert Invoice.objects.count() == 4 and InvoiceLine.objects.count() == 4
    assert AuditEvent.objects.filter(data__action="billing.period_closed").count() == 2


@pytest.mark.django_db
def test_a_duplicate_close_task_changes_nothing(eager):
    team = _team("UTC")
    with _at(2026, 12, 1, 0, 5):
        period_close_task.delay(team.pk, NOV.isoformat())
        first = BillingPeriod.objects.get()
        period_close_task.delay(team.pk, NOV.isoformat())
    again = BillingPeriod.objects.get()
    assert again.closed_at == first.closed_at and Invoice.objects.count() == 2
    assert AuditEvent.objects.filter(data__action="billing.period_closed").count() == 1


@pytest.mark.django_db
def test_missed_months_are_all_closed_and_a_new_team_has_nothing_due():
    late = _team("UTC")
    BillingPeriod.objects.create(team=late, start=SEP, status="closed", currency="CNY", planned_cost=0, cost=0,
                                 closed_at=datetime(2026, 10, 1, 1, tzinfo=UTC))
    stuck = _team("UTC")  # a close that died after creating its period row
    BillingPeriod.objects.create(team=stuck, start=OCT, currency="CNY")
    BillingPeriod.objects.create(team=stuck, start=NOV, status="closed", currency="CNY", planned_cost=0, cost=0,
                                 closed_at=datetime(2026, 12, 1, 1, tzinfo=UTC))
    fresh = TeamFactory(timezone="UTC")  # created now: no month of it is over
    Team.objects.filter(pk=fresh.pk).update(created_at=datetime(2026, 12, 1, 9, tzinfo=UTC))
    first_month = TeamFactory(timezone="UTC")  # created during November: November is due
    Team.objects.filter(pk=first_month.pk).update(created_at=datetime(2026, 11, 20, tzinfo=UTC))
    due = periods_due_to_close(now=datetime(2026, 12, 2, tzinfo=UTC))
    assert due == [(late.pk, OCT), (late.pk, NOV), (stuck.pk, OCT), (first_month.pk, NOV)]


def _closed(team, start=NOV, **kwargs):
    from billing.services import period_close

    return period_close(team=team, start=start, wait_seconds=0, **kwargs)


@pytest.mark.django_db
def test_finalize_waits_for_the_grace_days(eager):
    review = _team("Asia/Shanghai")
    BillingPolicyFactory(team=review, grace_days=3)
    prompt = _team("UTC")  # no policy row: grace 0
    with _at(2026, 12, 1, 0, 5):
        periods_close_due_task.delay()
    closed_at = BillingPeriod.objects.get(team=review).closed_at
    with time_machine.travel(closed_at + timedelta(days=3) - timedelta(minutes=1), tick=False):
        assert periods_finalize_due_task.delay().get() == 1
    assert _statuses() == {("Asia/Shanghai", NOV): "closed", ("UTC", NOV): "finalized"}
    with time_machine.travel(closed_at + timedelta(days=3), tick=False):
        assert periods_finalize_due_task.delay().get() == 1
        numbers = sorted(Invoice.objects.values_list("number", flat=True))
        assert periods_finalize_due_task.delay().get() == 0
    assert _statuses() == {("Asia/Shanghai", NOV): "finalized", ("UTC", NOV): "finalized"}
    assert len(numbers) == 4 and all(numbers)
    assert sorted(Invoice.objects.values_list("number", flat=True)) == numbers
    assert AuditEvent.objects.filter(data__action="billing.period_finalized").count() == 2


@pytest.fixture()
def statements_sent(monkeypatch) -> list:
    """The (period id, status) of every period_statements_send call, which sends nothing here."""
    sent = []
    fake = types.ModuleType("billing.services.statements")
    fake.period_statements_send = lambda *, period: sent.append((period.pk, period.status))
    monkeypatch.setitem(sys.modules, "billing.services.statements", fake)
    return sent


@pytest.mark.django_db
def test_finalize_sends_statements_when_that_service_exists(eager, statements_sent):
    team = _team("UTC")
    with _at(2026, 12, 1, 0, 5):
        period = _closed(team)
    sent = statements_sent
    with _at(2026, 12, 2, 2, 20):
        assert periods_finalize_due_task.delay().get() == 1
    assert sent == [(period.pk, "finalized")]


def test_the_schedule_names_existing_tasks_with_an_expiry():
    import importlib

    for name, entry in settings.CELERY_BEAT_SCHEDULE.items():
        module, _, task = entry["task"].rpartition(".")
        assert module.endswith(".tasks") and hasattr(importlib.import_module(module), task), name
        assert entry["options"]["expires"] > 0
        assert entry["task"] in celery_app.tasks


# --- a real worker on the Redis broker ---------------------------------------------------

def _database_url() -> str:
    db = settings.DATABASES["default"]
    auth = db["USER"] + (f":{db['PASSWORD']}" if db.get("PASSWORD") else "")
    return f"postgres://{auth}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


@pytest.mark.django_db(transaction=True)
def test_a_real_worker_closes_once_under_a_duplicate_delivery(tmp_path):
    broker = os.environ.get("TEST_CELERY_BROKER_URL") or settings.REDIS_URL
    if not broker.startswith("redis://"):
        pytest.skip("needs Redis (REDIS_URL or TEST_CELERY_BROKER_URL)")
    team = _team("UTC")
    month = date.today().replace(day=1)
    month = date(month.year - (month.month == 1), (month.month - 2) % 12 + 1, 1)  # the month before this one
    for member in team.members.all():
        usage(member, month, prompt=300, completion=100)
    queue = f"qh-test-{uuid.uuid4().hex[:8]}"  # this test's own queue: nothing else reads or writes it
    task_id = str(uuid.uuid4())
    with celery_app.connection_for_write(broker) as conn:
        for _ in range(2):  # the same message twice: a redelivery
            period_close_task.apply_async((team.pk, month.isoformat()), task_id=task_id, queue=queue,
                                          connection=conn)
    log_path = tmp_path / "worker.log"
    env = {**os.environ, "CELERY_BROKER_URL": broker, "CELERY_TASK_ALWAYS_EAGER": "false",
           "DATABASE_URL": _database_url(), "SECRET_KEY": "test-only-not-secret", "DEBUG": "false",
           "QWENHUB_UPSTREAM_TIMEOUT": "3"}
    with open(log_path, "wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "qwenhub", "worker", "--pool", "solo", "-Q", queue,
             "-n", f"{queue}@%h", "--without-gossip", "--without-mingle", "--without-heartbeat",
             "--loglevel", "INFO"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 20
            while log_path.read_text(errors="replace").count(f"[{task_id}] succeeded") < 2:
                assert worker.poll() is None, log_path.read_text(errors="replace")[-3000:]
                assert time.monotonic() < deadline, log_path.read_text(errors="replace")[-3000:]
                time.sleep(0.2)
        finally:
            worker.terminate()
            try:
                worker.wait(timeout=10)
            except subprocess.TimeoutExpired:
                worker.kill()
    period = BillingPeriod.objects.get(team=team)
    assert period.status == "closed" and period.start == month
    assert Invoice.objects.filter(period=period).count() == 2
    assert InvoiceLine.objects.filter(invoice__period=period).count() == 2
    assert AuditEvent.objects.filter(data__action="billing.period_closed", subject_id=period.pk).count() == 1


@pytest.mark.django_db
def test_the_daily_task_retries_statements_still_pending(eager, statements_sent):
    """A statement the mail server refused stays pending in the outbox; the next daily run sends it."""
    from billing.models import StatementEmail

    team = _team("UTC")
    with _at(2026, 12, 1, 0, 5):
        period = _closed(team)
    with _at(2026, 12, 2, 2, 20):
        periods_finalize_due_task.delay().get()
    sent = [pk for pk, _ in statements_sent]
    assert sent == [period.pk]  # finalized, its statements sent once
    invoice = period.invoices.order_by("pk").first()
    StatementEmail.objects.create(kind=StatementEmail.Kind.MEMBER, team=team, period=period, invoice=invoice,
                                  message_id="<retry@qwenhub.test>", status=StatementEmail.Status.PENDING)
    with _at(2026, 12, 3, 2, 20):
        assert periods_finalize_due_task.delay().get() == 0  # nothing left to finalize
    assert [pk for pk, _ in statements_sent] == [period.pk, period.pk]  # but the pending statement is retried
