"""period_set_actual_cost (recompute the drafts) and period_finalize (numbers without gaps)."""
import threading
import zoneinfo
from datetime import date, datetime
from decimal import Decimal

import pytest
from django.core.exceptions import ValidationError
from django.db import connection

from billing.models import BillingPeriod, Invoice, InvoiceLine
from billing.services import (
    COST_INVALID, COST_REASON_REQUIRED, PERIOD_FINALIZED_ALREADY, PERIOD_OPEN, billing_policy_update, period_close,
    period_finalize, period_set_actual_cost,
)
from billing.tests.factories import MemberJoinedFactory, usage
from tenants.models import AuditEvent
from tenants.tests.factories import TeamFactory, UserFactory

D = Decimal
SHANGHAI = zoneinfo.ZoneInfo("Asia/Shanghai")
OCT, NOV = date(2026, 10, 1), date(2026, 11, 1)
AFTER_NOV = datetime(2026, 12, 1, 0, 10, tzinfo=SHANGHAI)


def _closed(team=None, start=NOV, cost="3000.00"):
    team = team or TeamFactory(slug="lab", monthly_cost=cost)
    members = [MemberJoinedFactory(team=team) for _ in range(3)]
    usage(members[0], start, prompt=1000, completion=1000)
    usage(members[1], start, prompt=1000, completion=0)
    return period_close(team=team, start=start, now=AFTER_NOV, wait_seconds=0), members


def _lines_sum(period):
    for invoice in period.invoices.all():
        assert sum((l.amount for l in invoice.lines.all()), D(0)) == invoice.amount
    assert sum((i.allocated for i in period.invoices.all()), D(0)) == period.allocated


@pytest.mark.django_db
def test_actual_cost_recomputes_the_drafts_with_the_closes_snapshot():
    period, (a, b, c) = _closed()
    admin = UserFactory()
    billing_policy_update(team=period.team, kind="equal")  # after the close: must not apply to this month
    period = period_set_actual_cost(period=period, amount="2999.99", actor=admin, reason="the real GPU bill")
    assert (period.actual_cost, period.cost, period.planned_cost) == (D("2999.99"), D("2999.99"), D("3000.00"))
    amounts = {i.member_id: i.amount for i in period.invoices.all()}
    assert amounts == {a.pk: D("1999.99"), b.pk: D("1000.00"), c.pk: D("0.00")}  # 1999.993… and 999.996…
    assert period.applied_policy == "usage" and InvoiceLine.objects.count() == 2
    _lines_sum(period)
    event = AuditEvent.objects.get(data__action="billing.actual_cost_set")
    assert (event.actor, event.reason, event.data["after"]) == (admin, "the real GPU bill", "2999.99")
    # the same again: the same drafts
    again = period_set_actual_cost(period=period, amount="2999.99", actor=admin, reason="again")
    assert {i.member_id: i.amount for i in again.invoices.all()} == amounts and Invoice.objects.count() == 3


@pytest.mark.django_db
@pytest.mark.parametrize("amount", ["-1", "12.345", "abc", "NaN", "Infinity"])
def test_actual_cost_refuses_bad_amounts_and_changes_nothing(amount):
    period, _ = _closed()
    with pytest.raises(ValidationError) as exc:
        period_set_actual_cost(period=period, amount=amount, reason="x")
    assert exc.value.messages == [COST_INVALID.format(currency="CNY", unit=D("0.01"))]
    period.refresh_from_db()
    assert period.actual_cost is None and period.cost == D("3000.00")


@pytest.mark.django_db
def test_actual_cost_needs_a_reason_and_a_closed_period():
    period, _ = _closed()
    with pytest.raises(ValidationError) as exc:
        period_set_actual_cost(period=period, amount="1.00", reason="  ")
    assert exc.value.messages == [COST_REASON_REQUIRED]
    open_period = BillingPeriod.objects.create(team=period.team, start=date(2026, 12, 1), currency="CNY")
    with pytest.raises(ValidationError) as exc:
        period_set_actual_cost(period=open_period, amount="1.00", reason="x")
    assert exc.value.messages == [PERIOD_OPEN.format(team="lab", month="2026-12")]
    period_finalize(period=period)
    with pytest.raises(ValidationError) as exc:
        period_set_actual_cost(period=period, amount="1.00", reason="x")
    assert exc.value.messages == [PERIOD_FINALIZED_ALREADY.format(team="lab", month="2026-11")]


@pytest.mark.django_db
def test_jpy_has_no_minor_unit():
    team = TeamFactory(slug="jp", currency="JPY", monthly_cost="1000.00")
    period, _ = _closed(team=team)
    period = period_set_actual_cost(period=period, amount="1001", reason="bill")
    assert sorted(i.amount for i in period.invoices.all()) == [D(0), D(334), D(667)]  # 667.33… and 333.66…
    with pytest.raises(ValidationError):
        period_set_actual_cost(period=period, amount="1000.50", reason="bill")


@pytest.mark.django_db
def test_finalize_numbers_invoices_per_team_without_gaps_and_is_idempotent():
    team = TeamFactory(slug="lab", monthly_cost="300.00")
    oct_period, members = _closed(team=team, start=OCT)
    first = period_finalize(period=oct_period)
    assert first.status == BillingPeriod.Status.FINALIZED and first.finalized_at is not None
    assert list(first.invoices.order_by("member_id").values_list("number", flat=True)) == [
        "LAB-2026-10-001", "LAB-2026-10-002", "LAB-2026-10-003"]
    again = period_finalize(period=first)
    assert again.finalized_at == first.finalized_at
    usage(members[2], NOV, prompt=10, completion=0)
    nov = period_close(team=team, start=NOV, now=AFTER_NOV, wait_seconds=0)
    nov = period_finalize(period=nov)
    assert list(nov.invoices.order_by("member_id").values_list("sequence", flat=True)) == [4, 5, 6]
    assert nov.invoices.get(member=members[2]).number == "LAB-2026-11-006"
    assert AuditEvent.objects.filter(data__action="billing.period_finalized").count() == 2


@pytest.mark.django_db
def test_finalize_refuses_an_open_period_and_changes_nothing():
    team = TeamFactory(slug="lab")
    period = BillingPeriod.objects.create(team=team, start=NOV, currency="CNY")
    with pytest.raises(ValidationError) as exc:
        period_finalize(period=period)
    assert exc.value.messages == [PERIOD_OPEN.format(team="lab", month="2026-11")]
    period.refresh_from_db()
    assert period.status == BillingPeriod.Status.OPEN and not AuditEvent.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_two_finalizes_of_one_team_at_once_take_distinct_numbers():
    team = TeamFactory(slug="lab", monthly_cost="300.00")
    oct_period, members = _closed(team=team, start=OCT)
    nov_period = period_close(team=team, start=NOV, now=AFTER_NOV, wait_seconds=0)
    barrier, errors = threading.Barrier(4), []

    def finalize(period):
        try:
            barrier.wait()
            period_finalize(period=period)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=finalize, args=(p,)) for p in (oct_period, nov_period, oct_period, nov_period)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(Invoice.objects.values_list("sequence", flat=True)) == [1, 2, 3, 4, 5, 6]
    assert Invoice.objects.values("number").distinct().count() == 6
    assert AuditEvent.objects.filter(data__action="billing.period_finalized").count() == 2


@pytest.mark.django_db
def test_the_database_refuses_to_change_an_issued_invoice_or_its_lines():
    from django.db import IntegrityError, transaction
    period, (a, b, c) = _closed()
    draft = period.invoices.get(member=a)
    Invoice.objects.filter(pk=draft.pk).update(share=draft.share)  # a draft may change
    period_finalize(period=period)
    issued = period.invoices.get(member=a)
    line = issued.lines.first()
    attempts = [
        lambda: Invoice.objects.filter(pk=issued.pk).update(amount=0),
        lambda: Invoice.objects.filter(pk=issued.pk).delete(),
        lambda: InvoiceLine.objects.filter(pk=line.pk).update(amount=0),
        lambda: InvoiceLine.objects.filter(pk=line.pk).delete(),
        lambda: InvoiceLine.objects.create(invoice=issued, kind="base", amount=1),
    ]
    for attempt in attempts:
        with pytest.raises(IntegrityError, match="is issued|protected foreign keys"), transaction.atomic():
            attempt()
    issued.refresh_from_db()
    assert issued.amount == D("2000.00") and issued.lines.count() == 1
