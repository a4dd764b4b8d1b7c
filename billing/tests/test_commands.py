"""close_period, finalize_period, cost_report: outputs, and bad input → a clear error, nothing changed."""
import csv
import io
import json
from datetime import date
from decimal import Decimal

import pytest
from django.core.management.base import CommandError
from django.utils import timezone

from billing.management.months import MONTH_FUTURE, MONTH_MALFORMED, previous_period_start
from billing.models import BillingPeriod, Invoice
from billing.services import PERIOD_OPEN
from billing.tests.factories import MemberJoinedFactory, usage
from tenants.models import AuditEvent
from tenants.periods import next_period_start, period_start_for
from tenants.services import TEAM_UNKNOWN
from tenants.tests.factories import TeamFactory, UserFactory
from tenants.tests.utils import run_command

pytestmark = pytest.mark.django_db
D = Decimal


@pytest.fixture
def lab():
    """A team with usage last month and this month (months in the team's time zone, today's clock)."""
    team = TeamFactory(slug="lab", monthly_cost="3000.00", timezone="Asia/Shanghai")
    this = period_start_for(team.timezone)
    last = previous_period_start(this)
    alice = MemberJoinedFactory(team=team, user=UserFactory(username="alice"))
    bob = MemberJoinedFactory(team=team, user=UserFactory(username="bob"))
    for start in (last, this):
        usage(alice, start, prompt=2000, completion=0)
        usage(bob, start, prompt=1000, completion=0)
    return team, last, this


def test_close_then_finalize_the_previous_month(lab):
    team, last, _ = lab
    out, _ = run_command("close_period", "lab")
    assert out.startswith(f"Closed lab {last:%Y-%m}: 2 draft invoice(s), 3000.00 CNY split by usage.")
    out, _ = run_command("close_period", "lab", "--month", f"{last:%Y-%m}")
    assert out == f"lab {last:%Y-%m} was already closed: nothing changed.\n"
    out, _ = run_command("finalize_period", "lab")
    assert out == (f"Finalized lab {last:%Y-%m}: 2 invoice(s) issued "
                   f"(LAB-{last:%Y-%m}-001 … LAB-{last:%Y-%m}-002).\n")
    out, _ = run_command("finalize_period", "lab")
    assert out == f"lab {last:%Y-%m} was already finalized: nothing changed.\n"
    assert Invoice.objects.count() == 2


def test_cost_report_table_csv_and_json_of_the_month_so_far(lab):
    team, _, this = lab
    out, _ = run_command("cost_report", "lab")
    lines = out.splitlines()
    assert lines[0] == f"lab {this:%Y-%m} (projected so far): 3000.00 CNY, policy usage"
    assert lines[2].split() == ["member", "requests", "prompt_tokens", "completion_tokens", "amount",
                                "share_percent", "invoice"]
    assert lines[3].split() == ["alice", "1", "2000", "0", "2000.00", "66.67"]
    assert lines[4].split() == ["bob", "1", "1000", "0", "1000.00", "33.33"]
    out, _ = run_command("cost_report", "lab", "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [(r["member"], r["amount"]) for r in rows] == [("alice", "2000.00"), ("bob", "1000.00")]
    assert sum(D(r["amount"]) for r in rows) == D("3000.00")
    out, _ = run_command("cost_report", "lab", "--format", "json")
    data = json.loads(out)
    assert (data["projected"], data["cost"], data["allocated"], data["status"]) == (True, "3000.00", "3000.00", "open")
    assert [m["member"] for m in data["members"]] == ["alice", "bob"]
    assert not BillingPeriod.objects.exists()  # a report writes nothing


def test_cost_report_of_a_closed_month_shows_its_invoices(lab):
    team, last, _ = lab
    run_command("close_period", "lab")
    run_command("finalize_period", "lab")
    data = json.loads(run_command("cost_report", "lab", "--month", f"{last:%Y-%m}", "--format", "json")[0])
    assert data["projected"] is False and data["status"] == "finalized"
    assert [m["invoice"] for m in data["members"]] == [f"LAB-{last:%Y-%m}-001", f"LAB-{last:%Y-%m}-002"]


@pytest.mark.parametrize("command", ["close_period", "finalize_period", "cost_report"])
def test_bad_input_is_a_clear_error_and_changes_nothing(lab, command):
    team, last, this = lab
    future = next_period_start(this)
    with pytest.raises(CommandError) as exc:
        run_command(command, "nope")
    assert str(exc.value) == TEAM_UNKNOWN.format(slug="nope")
    for month in ("2026-13", "2026-1", "november", "2026-11-01"):
        with pytest.raises(CommandError) as exc:
            run_command(command, "lab", "--month", month)
        assert str(exc.value) == MONTH_MALFORMED.format(value=month)
    with pytest.raises(CommandError) as exc:
        run_command(command, "lab", "--month", f"{future:%Y-%m}")
    assert str(exc.value) == MONTH_FUTURE.format(month=f"{future:%Y-%m}", team="lab", tz="Asia/Shanghai",
                                                 today=this)
    assert not BillingPeriod.objects.exists() and not AuditEvent.objects.exists()


def test_closing_the_current_month_or_finalizing_an_open_one_is_refused(lab):
    team, last, this = lab
    with pytest.raises(CommandError, match="is not over yet"):
        run_command("close_period", "lab", "--month", f"{this:%Y-%m}")
    with pytest.raises(CommandError) as exc:
        run_command("finalize_period", "lab")
    assert str(exc.value) == PERIOD_OPEN.format(team="lab", month=f"{last:%Y-%m}")
    BillingPeriod.objects.create(team=team, start=last, currency="CNY")
    with pytest.raises(CommandError) as exc:
        run_command("finalize_period", "lab", "--month", f"{last:%Y-%m}")
    assert str(exc.value) == PERIOD_OPEN.format(team="lab", month=f"{last:%Y-%m}")
    assert BillingPeriod.objects.get().status == "open" and not Invoice.objects.exists()


def test_the_previous_month_wraps_the_year():
    assert previous_period_start(date(2027, 1, 1)) == date(2026, 12, 1)
    assert previous_period_start(date(2026, 3, 1)) == date(2026, 2, 1)
    assert timezone.now()  # the fixture's months follow the clock
