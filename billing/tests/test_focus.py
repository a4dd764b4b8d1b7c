"""The FOCUS CSV of a period's split (billing.focus, export_focus)."""
import csv
import io
import json
from datetime import date, datetime
from decimal import Decimal

import pytest
from django.core.management.base import CommandError

from billing.focus import COLUMNS
from billing.models import BillingPeriod, InvoiceLine
from billing.services import PERIOD_OPEN, period_close
from billing.tests.conftest import SHANGHAI, finalized_month
from billing.tests.factories import MemberJoinedFactory, usage
from tenants.tests.factories import TeamFactory
from tenants.tests.utils import run_command

pytestmark = pytest.mark.django_db


def _export(*args):
    out, err = run_command("export_focus", "lab", *args)
    return list(csv.DictReader(io.StringIO(out))), out, err


def test_the_focus_csv_has_one_row_per_line_and_sums_to_the_allocated_amount():
    period, members = finalized_month()
    rows, out, err = _export("--month", "2026-11")
    assert out.splitlines()[0].split(",") == COLUMNS and err == ""
    assert len(rows) == InvoiceLine.objects.filter(invoice__period=period).count() == 3
    assert sum(Decimal(r["BilledCost"]) for r in rows) == period.allocated == Decimal("2999.99")
    assert all(r["BilledCost"] == r["EffectiveCost"] and r["BillingCurrency"] == "CNY" for r in rows)
    # the month in Asia/Shanghai, as UTC instants (the end exclusive)
    assert {(r["BillingPeriodStart"], r["BillingPeriodEnd"]) for r in rows} == {
        ("2026-10-31T16:00:00Z", "2026-11-30T16:00:00Z")}
    alice = [r for r in rows if json.loads(r["Tags"])["member"] == "alice"]
    assert [(r["ChargeCategory"], r["ConsumedQuantity"], r["ConsumedUnit"], json.loads(r["Tags"])["model"])
            for r in alice] == [("Usage", "500", "Tokens", "qwen2.5-72b"), ("Usage", "4500", "Tokens",
                                                                             "qwen2.5-7b-instruct")]
    assert {r["InvoiceId"] for r in alice} == {period.invoices.get(member=members["alice"]).number}


def test_export_focus_refuses_an_open_month_and_warns_about_drafts():
    team = TeamFactory(slug="lab")
    usage(MemberJoinedFactory(team=team), date(2026, 11, 1))
    with pytest.raises(CommandError) as exc:
        _export("--month", "2026-11")
    assert str(exc.value) == PERIOD_OPEN.format(team="lab", month="2026-11")
    assert not BillingPeriod.objects.exists()
    period_close(team=team, start=date(2026, 11, 1), now=datetime(2026, 12, 1, 1, tzinfo=SHANGHAI), wait_seconds=0)
    rows, _, err = _export("--month", "2026-11")
    assert "not finalized: these are drafts" in err and [r["InvoiceId"] for r in rows] == [""]
