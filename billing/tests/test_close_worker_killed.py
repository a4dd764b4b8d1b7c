"""A Celery worker SIGKILLed in the middle of a month's close: the next run closes it exactly once.

The close (billing.services.period_close) holds the period row in one transaction while it
releases the month's stuck reservations, opens the next month's counters and writes the
drafts. To kill the worker there, and only there, the test holds a SHARE lock on the invoice
table from its own connection: the close runs up to its first invoice INSERT and waits. The
test sees the worker's backend waiting in its transaction (having already moved the counters
and written audit rows), SIGKILLs the worker, then lets go of the lock: PostgreSQL finds the
client gone and rolls the whole close back. A new worker and the next hourly run then close
the month: one period, one invoice per member, the split of the cost to the cent, the
reservations released and reported once, and `reconcile` clean. A redelivery of the killed
worker's message (acks_late) changes nothing. A second test kills the worker after the close's
commit, while its report of the released reservations is on the wire: no second report.

Workers, SMTP server and clock handling as in test_month_end_to_end (its fixtures).
"""
import time
import zoneinfo
from datetime import datetime
from decimal import Decimal

import psycopg
import pytest
import time_machine
from django.db import connection
from django.utils import timezone

from billing.models import BillingPeriod, Invoice, InvoiceLine
from billing.selectors import billing_policy_for_team, period_split, policy_params
from billing.services import billing_policy_update
from billing.services.audit import PERIOD_CLOSED, RESERVATIONS_RELEASED
from billing.tasks import period_close_task, periods_close_due_task
from billing.tests.factories import MemberJoinedFactory, usage
from billing.tests.test_month_end_to_end import (  # noqa: F401 - fixtures
    NOV, WAIT, _database_url, month_workers, moved, smtp)
from tenants.models import AuditEvent, Member, QuotaCounter, QuotaReservation
from tenants.tests.factories import QuotaCounterFactory, TeamFactory, UserFactory
from tenants.tests.utils import run_command

D = Decimal
SHANGHAI = zoneinfo.ZoneInfo("Asia/Shanghai")
DEC = NOV.replace(month=12)
MEMBERS = 12


def _mill():
    """mill (Asia/Shanghai, CNY, 1000.00 a month, usage policy): an admin and 11 members, November's usage
    with counters that agree with it, and two members' requests still reserved at midnight."""
    with time_machine.travel(datetime(2026, 11, 2, 9, tzinfo=SHANGHAI), tick=False):
        team = TeamFactory(slug="mill", name="Mill", monthly_cost="1000.00", timezone="Asia/Shanghai",
                           currency="CNY")
        billing_policy_update(team=team, kind="usage", grace_days=3)
    members = [MemberJoinedFactory(team=team, user=UserFactory(username=f"m{i:02d}"),
                                   role=Member.Role.ADMIN if i == 0 else Member.Role.MEMBER)
               for i in range(MEMBERS)]
    stuck = {}
    for i, member in enumerate(members):
        rows = [usage(member, NOV, prompt=100 * (i + 1) + 7 * n, completion=33 * i + n,
                      started_at=datetime(2026, 11, 1 + n, 10 + i % 10, tzinfo=SHANGHAI))
                for n in range(i % 4)]  # m00, m04, m08 used nothing
        reserved = (1, 700 + i) if i in (3, 7) else (0, 0)
        counter = QuotaCounterFactory(member=member, period_start=NOV, requests_used=len(rows),
                                      tokens_used=sum(r.total_tokens for r in rows),
                                      requests_reserved=reserved[0], tokens_reserved=reserved[1])
        if reserved[0]:
            # the gateway's row of a request admitted before midnight that will never settle
            QuotaReservation.objects.create(counter=counter, tokens=reserved[1], created_at=timezone.now())
            stuck[counter.pk] = reserved
    return team, members, stuck


def _waiting_on_invoices() -> int | None:
    """The pid of the backend waiting for the invoice table's lock, if one is."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pid FROM pg_locks WHERE relation = 'billing_invoice'::regclass AND NOT granted")
        row = cursor.fetchone()
    return row[0] if row else None


def _locks_of(pid: int) -> set[str]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT relation::regclass::text FROM pg_locks WHERE pid = %s AND granted "
                       "AND mode = 'RowExclusiveLock' AND relation IS NOT NULL", [pid])
        return {r[0] for r in cursor.fetchall()}


def _until(found, what: str, bound: float = WAIT):
    deadline = time.monotonic() + bound
    while not (value := found()):
        assert time.monotonic() < deadline, f"no {what} within {bound} s"
        time.sleep(0.05)
    return value


def _audits(action: str) -> int:
    return AuditEvent.objects.filter(data__action=action).count()


def _state(team):
    """What a close writes, as plain values: compared before and after a rerun."""
    period = BillingPeriod.objects.get(team=team, start=NOV)
    invoices = sorted(Invoice.objects.filter(period=period).values_list("pk", "member_id", "amount", "allocated"))
    lines = sorted(InvoiceLine.objects.filter(invoice__period=period).values_list("pk", "invoice_id", "amount"))
    return (period.pk, period.status, period.closed_at, period.cost, period.released_reservations, invoices, lines,
            _audits(PERIOD_CLOSED), _audits(RESERVATIONS_RELEASED),
            QuotaCounter.objects.filter(member__team=team, period_start=DEC).count())


@pytest.mark.django_db(transaction=True)  # the worker sees only committed rows
def test_a_worker_killed_mid_close_leaves_nothing_and_the_next_run_closes_the_month_once(month_workers, smtp):
    start, send = month_workers
    inbox, _ = smtp
    first = start()
    team, members, stuck = _mill()
    counters_before = {c.pk: (c.requests_reserved, c.tokens_reserved)
                       for c in QuotaCounter.objects.filter(member__team=team, period_start=NOV)}
    _, split = period_split(team=team, start=NOV, cost=team.monthly_cost,
                            params=policy_params(billing_policy_for_team(team=team)))
    expected = {member_id: amount for member_id, amount in split.amounts.items()}
    assert sum(expected.values()) == D("1000.00") and len(set(expected.values())) > 3  # a real split

    # -- the close runs up to its first invoice and waits there; the worker is killed ---------
    blocker = psycopg.connect(_database_url())  # its own transaction, outside Django's connection
    try:
        blocker.execute("LOCK TABLE billing_invoice IN SHARE MODE")
        assert first.result(send(periods_close_due_task, now=moved(2026, 12, 1, 0, 5))) == "1"
        pid = _until(lambda: _waiting_on_invoices(), "close waiting for the invoice table")
        # it is deep in its transaction: the reservations released, the audit rows and December's counters written
        written = {model._meta.db_table for model in (QuotaCounter, QuotaReservation, AuditEvent)}
        assert written <= _locks_of(pid), _locks_of(pid)
        first.kill()
    finally:
        blocker.rollback()
        blocker.close()
    _until(lambda: not _pid_alive(pid), "the killed worker's backend to end")

    # nothing of the close survived: the period exists (created before the transaction) and is open
    period = BillingPeriod.objects.get(team=team, start=NOV)
    assert period.status == BillingPeriod.Status.OPEN and period.closed_at is None
    assert not Invoice.objects.filter(period=period).exists()
    assert {c.pk: (c.requests_reserved, c.tokens_reserved)
            for c in QuotaCounter.objects.filter(member__team=team, period_start=NOV)} == counters_before
    assert QuotaReservation.objects.filter(counter__member__team=team).count() == len(stuck)
    assert not QuotaCounter.objects.filter(member__team=team, period_start=DEC).exists()
    assert _audits(PERIOD_CLOSED) == _audits(RESERVATIONS_RELEASED) == 0
    assert inbox.messages == []

    # -- a new worker; the next hourly run finds the month still open and closes it -------------
    second = start()
    assert second.result(send(periods_close_due_task, now=moved(2026, 12, 1, 1, 5))) == "1"
    assert second.results_of("period_close_task", 1) == ["None"]
    period.refresh_from_db()
    assert (period.status, period.cost, period.currency) == (BillingPeriod.Status.CLOSED, D("1000.00"), "CNY")
    invoices = list(Invoice.objects.filter(period=period))
    assert sorted(i.member_id for i in invoices) == sorted(m.pk for m in members)  # one each, none twice
    assert {i.member_id: i.amount for i in invoices} == expected
    assert sum(i.amount for i in invoices) == period.cost  # to the cent
    for invoice in invoices:
        assert sum(line.amount for line in invoice.lines.all()) == invoice.amount
    # the reservations: released once, recorded on the period and in the audit trail, reported once
    assert not QuotaReservation.objects.filter(counter__member__team=team).exists()
    assert not QuotaCounter.objects.filter(member__team=team, period_start=NOV).exclude(
        requests_reserved=0, tokens_reserved=0).exists()
    assert sorted((r["counter_id"], r["requests"], r["tokens"]) for r in period.released_reservations) == sorted(
        (pk, *reserved) for pk, reserved in stuck.items())
    assert (_audits(PERIOD_CLOSED), _audits(RESERVATIONS_RELEASED)) == (1, len(stuck))
    assert QuotaCounter.objects.filter(member__team=team, period_start=DEC).count() == MEMBERS  # the quota reset
    _until(lambda: inbox.messages, "the report of released reservations")
    assert [(m["To"], "2 stuck reservations released" in m["Subject"]) for m in inbox.messages] == [
        (members[0].user.email, True)]

    # -- the killed worker's message delivered again (acks_late), and the next hourly run --------
    closed = _state(team)
    assert second.result(send(period_close_task, team.pk, NOV.isoformat())) == "None"
    assert second.result(send(periods_close_due_task, now=moved(2026, 12, 1, 2, 5))) == "0"
    assert _state(team) == closed
    assert len(inbox.messages) == 1  # no second report
    out, _ = run_command("reconcile", team.slug, "--month", "2026-11")
    assert out.strip() == "mill 2026-11: the counters agree with the usage rows."


def _pid_alive(pid: int) -> bool:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", [pid])
        return cursor.fetchone() is not None


@pytest.mark.django_db(transaction=True)
def test_a_worker_killed_while_the_close_reports_its_released_reservations_sends_no_second_report(
        month_workers, smtp):
    """After the commit the close e-mails the admins what it released; killed on the wire, nobody sends it again.

    (The server has the message when the worker dies waiting for its "250": the close that
    committed was the only one to send, and a rerun finds the month closed.)
    """
    start, send = month_workers
    inbox, _ = smtp
    first = start()
    team, members, stuck = _mill()
    inbox.hold_at = 1
    assert first.result(send(periods_close_due_task, now=moved(2026, 12, 1, 0, 5))) == "1"
    assert inbox.holding.wait(WAIT), first.log()[-3000:]
    first.kill()
    closed = _state(team)
    assert closed[1] == BillingPeriod.Status.CLOSED and len(closed[5]) == MEMBERS
    assert (closed[7], closed[8]) == (1, len(stuck))

    second = start()
    inbox.release.set()
    assert second.result(send(periods_close_due_task, now=moved(2026, 12, 1, 1, 5))) == "0"  # nothing due
    assert second.result(send(period_close_task, team.pk, NOV.isoformat())) == "None"  # the killed one's message
    assert _state(team) == closed
    assert [m["To"] for m in inbox.messages] == [members[0].user.email]  # the report, once
    assert not QuotaReservation.objects.filter(counter__member__team=team).exists()
    out, _ = run_command("reconcile", team.slug, "--month", "2026-11")
    assert "the counters agree with the usage rows" in out
