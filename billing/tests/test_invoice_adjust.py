"""invoice_adjust: a correction after finalize is an adjustment line, with its reason, on a later month."""
import zoneinfo
from datetime import date, datetime
from decimal import Decimal

import pytest
from django.core.exceptions import ValidationError

from billing.models import BillingPeriod, Invoice, InvoiceAdjustment, InvoiceLine
from billing.services import (
    ADJUSTMENT_INVALID, INVOICE_NOT_FINALIZED, REASON_REQUIRED, invoice_adjust, period_close, period_finalize,
    period_set_actual_cost,
)
from billing.tests.factories import MemberJoinedFactory, usage
from tenants.models import AuditEvent
from tenants.tests.factories import TeamFactory, UserFactory

D = Decimal
SHANGHAI = zoneinfo.ZoneInfo("Asia/Shanghai")
OCT, NOV, DEC = date(2026, 10, 1), date(2026, 11, 1), date(2026, 12, 1)
AFTER_NOV = datetime(2026, 12, 1, 0, 10, tzinfo=SHANGHAI)


@pytest.fixture
def finalized_october():
    team = TeamFactory(slug="lab", monthly_cost="100.00")
    a, b = MemberJoinedFactory(team=team), MemberJoinedFactory(team=team)
    usage(a, OCT, prompt=300, completion=0)
    usage(b, OCT, prompt=100, completion=0)
    period = period_close(team=team, start=OCT, now=AFTER_NOV, wait_seconds=0)
    return period_finalize(period=period), a, b


def _sums(invoice):
    assert sum((l.amount for l in invoice.lines.all()), D(0)) == invoice.amount


@pytest.mark.django_db
def test_an_adjustment_waits_for_the_open_month_and_lands_on_its_invoice(finalized_october):
    period, a, b = finalized_october
    invoice = period.invoices.get(member=a)
    admin = UserFactory()
    adjustment = invoice_adjust(invoice=invoice, amount="-5.00", reason="a failed batch job was billed", actor=admin)
    assert adjustment.period.start == NOV and adjustment.period.status == BillingPeriod.Status.OPEN
    assert not InvoiceLine.objects.filter(kind="adjustment").exists()
    usage(a, NOV, prompt=100, completion=0)
    usage(b, NOV, prompt=100, completion=0)
    nov = period_close(team=period.team, start=NOV, now=AFTER_NOV, wait_seconds=0)
    nov_invoice = nov.invoices.get(member=a)
    line = nov_invoice.lines.get(kind="adjustment")
    assert (line.amount, line.reason, line.model) == (D("-5.00"), "a failed batch job was billed", invoice.number)
    assert (nov_invoice.allocated, nov_invoice.amount) == (D("50.00"), D("45.00"))
    _sums(nov_invoice)
    assert sum((i.allocated for i in nov.invoices.all()), D(0)) == nov.allocated == D("100.00")
    # a recompute keeps the adjustment once
    nov = period_set_actual_cost(period=nov, amount="80.00", reason="bill")
    nov_invoice = nov.invoices.get(member=a)
    assert nov_invoice.lines.filter(kind="adjustment").count() == 1 and nov_invoice.amount == D("35.00")
    _sums(nov_invoice)
    # the October invoice is unchanged
    invoice.refresh_from_db()
    assert invoice.amount == D("75.00") and invoice.lines.count() == 1
    event = AuditEvent.objects.get(data__action="billing.invoice_adjusted")
    assert (event.member_id, event.actor, event.data["billed_in"]) == (a.pk, admin, "2026-11")


@pytest.mark.django_db
def test_an_adjustment_on_a_closed_month_is_written_at_once(finalized_october):
    period, a, b = finalized_october
    nov = period_close(team=period.team, start=NOV, now=AFTER_NOV, wait_seconds=0)
    invoice_adjust(invoice=period.invoices.get(member=b), amount="2.50", reason="undercharged")
    nov_invoice = nov.invoices.get(member=b)
    assert nov_invoice.amount == nov_invoice.allocated + D("2.50")
    _sums(nov_invoice)


@pytest.mark.django_db
def test_a_member_billed_nothing_later_still_gets_the_adjustment(finalized_october):
    period, a, b = finalized_october
    b.is_active = False
    b.save(update_fields=["is_active"])
    invoice_adjust(invoice=period.invoices.get(member=b), amount="-1.00", reason="refund")
    nov = period_close(team=period.team, start=NOV, now=AFTER_NOV, wait_seconds=0)
    refund = nov.invoices.get(member=b)
    assert (refund.allocated, refund.amount, refund.active_days) == (D("0.00"), D("-1.00"), 0)
    assert nov.invoices.get(member=a).allocated == D("100.00")  # b weighs nothing in the split


@pytest.mark.django_db
def test_adjusting_a_draft_or_with_a_bad_amount_or_no_reason_is_refused(finalized_october):
    period, a, b = finalized_october
    invoice = period.invoices.get(member=a)
    for amount in ("0", "1.001", "x"):
        with pytest.raises(ValidationError) as exc:
            invoice_adjust(invoice=invoice, amount=amount, reason="r")
        assert exc.value.messages == [ADJUSTMENT_INVALID.format(currency="CNY", unit=D("0.01"))]
    with pytest.raises(ValidationError) as exc:
        invoice_adjust(invoice=invoice, amount="1.00", reason=" ")
    assert exc.value.messages == [REASON_REQUIRED]
    nov = period_close(team=period.team, start=NOV, now=AFTER_NOV, wait_seconds=0)
    draft = Invoice.objects.get(period=nov, member=a)
    with pytest.raises(ValidationError, match="still a draft"):
        invoice_adjust(invoice=draft, amount="1.00", reason="r")
    assert "{" not in INVOICE_NOT_FINALIZED.format(member="m", month="x")
    assert not InvoiceAdjustment.objects.exists()


@pytest.mark.django_db
def test_an_adjustment_skips_a_month_already_finalized(finalized_october):
    period, a, b = finalized_october
    nov = period_finalize(period=period_close(team=period.team, start=NOV, now=AFTER_NOV, wait_seconds=0))
    adjustment = invoice_adjust(invoice=period.invoices.get(member=a), amount="1.00", reason="late fix")
    assert adjustment.period.start == DEC and adjustment.period.status == "open"
    assert nov.invoices.get(member=a).lines.filter(kind="adjustment").count() == 0
